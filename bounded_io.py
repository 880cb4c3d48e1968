"""Bounded I/O for every room that talks to the outside: deadlines, capped reads, atomic files.

The image fetcher, the `file=` reader, the emoji-config download and the model download all need
the same three guarantees — a wall-clock deadline, a byte cap that stops reading as soon as it is
passed, and files that are replaced whole or not at all — so they are written once, here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"


def remaining(deadline: float, timed_out: Callable[[], Exception]) -> float:
    """Seconds left before `deadline` (a `time.monotonic()` instant); raise `timed_out()` at 0."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise timed_out()
    return left


def read_capped(
    read_chunk: Callable[[int], bytes], max_bytes: int, too_large: Callable[[], Exception]
) -> bytes:
    """Read chunks until EOF; raise `too_large()` as soon as more than `max_bytes` arrived.

    `read_chunk(n)` gets how many more bytes would still fit (plus one), as a hint.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = read_chunk(max_bytes + 1 - total)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise too_large()
        chunks.append(chunk)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (not possible on every platform, hence best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write `path` through a temporary file in the same folder: fsync, then rename over it.

    Readers see the old file or the new one, never a mix. If the block raises, the temporary file
    is removed and `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    chunk_size: int = 64 * 1024,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Replace `path` with `data` atomically (see :func:`atomic_file`).

    `on_chunk(bytes_written)` runs after each chunk (progress reporting; tests use it to crash
    the writer half-way).
    """
    with atomic_file(path) as handle:
        view = memoryview(data)
        for start in range(0, len(view), chunk_size):
            handle.write(view[start : start + chunk_size])
            if on_chunk is not None:
                on_chunk(min(start + chunk_size, len(view)))


def remove_stale_temporaries(directory: Path, older_than: float = 600.0) -> None:
    """Delete temporary files a crashed writer left behind (they are never read).

    Only old ones: a young temporary file may belong to another process writing right now.
    """
    limit = time.time() - older_than
    with contextlib.suppress(OSError):
        for leftover in directory.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < limit:
                    leftover.unlink()
