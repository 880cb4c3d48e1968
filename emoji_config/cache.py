"""The on-disk cache of the last good config files, written so a crash never corrupts it.

Each file is stored byte for byte as downloaded (`emoji_mappings.json`, `mwe.txt`), next to a
small `<name>.meta.json` with the HTTP validators and timestamps. Both are replaced by rename, so a
reader sees either the old or the new file, never a mix. The meta carries the data's SHA-256: if a
crash lands between the two renames, the mismatch is noticed and the meta is ignored (the data is
still good; only the conditional-request validators are lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
META_SUFFIX = ".meta.json"
MAX_META_BYTES = 64 * 1024


def sha256(data: bytes) -> str:
    """Hex digest used to tie a meta file to its data file."""
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (not possible on every platform, hence best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(
    path: Path,
    data: bytes,
    *,
    chunk_size: int = 64 * 1024,
    on_chunk: Callable[[int], None] | None = None,
) -> None:
    """Replace `path` with `data`: temporary file in the same folder, fsync, rename.

    `on_chunk(bytes_written)` runs after each chunk (progress reporting; tests use it to crash
    the writer half-way). On any error the temporary file is removed and `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            view = memoryview(data)
            for start in range(0, len(view), chunk_size):
                handle.write(view[start : start + chunk_size])
                if on_chunk is not None:
                    on_chunk(min(start + chunk_size, len(view)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


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


@dataclass(frozen=True)
class CacheEntry:
    """One cached file: its bytes and the meta that belongs to them (empty if unknown)."""

    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


def _meta_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}{META_SUFFIX}"


def read_entry(cache_dir: Path, name: str, max_bytes: int) -> CacheEntry | None:
    """The cached copy of `name`, or None when absent, unreadable or too large.

    A meta file that does not describe these exact bytes is replaced by one holding only the
    file's modification time, so a hand-placed file works too.
    """
    path = cache_dir / name
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("emoji cache: cannot read %s: %s", path, exc)
        return None
    if len(data) > max_bytes:
        logger.warning("emoji cache: %s is larger than %d bytes, ignored", path, max_bytes)
        return None
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        raw = _meta_path(cache_dir, name).read_bytes()[:MAX_META_BYTES]
        loaded = json.loads(raw)
        if isinstance(loaded, dict) and loaded.get("sha256") == sha256(data):
            meta = loaded
    if not meta:
        meta = {"fetched_at": mtime, "checked_at": mtime}
    return CacheEntry(data, meta)


def write_meta(cache_dir: Path, name: str, meta: dict[str, Any]) -> None:
    """Replace the meta file of `name` atomically."""
    payload = json.dumps(meta, sort_keys=True, indent=1).encode()
    write_atomic(_meta_path(cache_dir, name), payload)


def write_entry(
    cache_dir: Path,
    name: str,
    data: bytes,
    meta: dict[str, Any],
) -> None:
    """Store a validated download: data first, then its meta (with the data's SHA-256)."""
    write_atomic(cache_dir / name, data)
    write_meta(cache_dir, name, {**meta, "sha256": sha256(data)})
