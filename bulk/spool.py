"""Job uploads on disk, within a quota, never filling the disk.

A job's uploads (images, zip entries) must outlive the request that brought them, so they are
written to one directory per job under ``JOBS_DIR/spool/``. Every write is checked first against
the quota (bytes of all kept jobs plus uploads in progress) and against the disk's free space
(:data:`MIN_FREE_BYTES` always stay free), and streamed in small steps with the per-file cap
enforced while reading, so a lying or endless upload costs at most the cap.

A directory being filled carries an ``.incomplete`` marker until its job is stored; a process that
dies in between leaves the marker, and :meth:`Spool.sweep_incomplete` removes such directories
once they are old enough that no upload can still be filling them. File names are chosen here
(``0``, ``1`` …); names from the client are never used on disk.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from captioning.errors import InsufficientStorage, LimitExceeded, too_large

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 256 * 1024 * 1024
INCOMPLETE = ".incomplete"
INCOMPLETE_MAX_AGE = 3600.0  # seconds after which an unfinished upload directory is removed
REF_PREFIX = "spool:"
_CHUNK = 64 * 1024


class Spool:
    """The spool root: hands out job directories and keeps the quota across them."""

    def __init__(
        self,
        root: Path,
        *,
        quota: int,
        used: Callable[[], int],
        min_free: int = MIN_FREE_BYTES,
    ) -> None:
        """`used()`: spool bytes of the jobs already stored (the job store knows them)."""
        self.root = root
        self.quota = quota
        self.min_free = min_free
        self._used = used
        self._lock = threading.Lock()
        self._in_progress = 0  # bytes written by uploads whose jobs are not stored yet

    def open(self) -> SpoolDir:
        """A new job directory, created (with its `.incomplete` marker) on the first write."""
        return SpoolDir(self, self.root / secrets.token_hex(12))

    def path_of(self, ref: str) -> Path | None:
        """The file a ``spool:`` input reference names, or None if it is not one."""
        if not ref.startswith(REF_PREFIX):
            return None
        relative = Path(ref[len(REF_PREFIX) :])
        if relative.is_absolute() or ".." in relative.parts:
            return None
        return self.root / relative

    def remove(self, directory: str | None) -> None:
        """Delete a job's directory (expired jobs); only directories inside the root."""
        if not directory:
            return
        path = self.root / directory
        if path.parent != self.root:
            log.warning("not removing %s: outside the spool root", path)
            return
        shutil.rmtree(path, ignore_errors=True)

    def sweep_incomplete(self, now: float | None = None) -> int:
        """Remove directories of uploads that never became jobs (a crash mid-upload)."""
        now = time.time() if now is None else now
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for child in self.root.iterdir():
                marker = child / INCOMPLETE
                with contextlib.suppress(OSError):
                    if marker.is_file() and now - marker.stat().st_mtime > INCOMPLETE_MAX_AGE:
                        shutil.rmtree(child, ignore_errors=True)
                        removed += 1
        if removed:
            log.info("removed %d unfinished upload directories", removed)
        return removed

    # -- accounting ----------------------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        """Count `size` more bytes, or refuse them (quota, free disk space)."""
        with self._lock:
            if self._used() + self._in_progress + size > self.quota:
                raise InsufficientStorage(
                    "not enough job storage left for these uploads (JOBS_DISK_QUOTA); "
                    "try again later"
                )
            if shutil.disk_usage(self.root).free - size < self.min_free:
                log.error("spool disk nearly full; refusing uploads")
                raise InsufficientStorage("the server's disk is nearly full; try again later")
            self._in_progress += size

    def _release(self, size: int) -> None:
        with self._lock:
            self._in_progress -= size


class SpoolDir:
    """One job's upload directory while its request is being read."""

    def __init__(self, spool: Spool, path: Path) -> None:
        self.spool = spool
        self.path = path
        self.bytes = 0
        self._files = 0
        self._closed = False
        self.created = False

    @property
    def name(self) -> str | None:
        """The directory's name under the spool root; None while nothing was written."""
        return self.path.name if self.created else None

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True)
            (self.path / INCOMPLETE).touch()
        except OSError as exc:
            log.error("cannot create a spool directory under %s: %s", self.spool.root, exc)
            raise InsufficientStorage("job storage is unavailable; try again later") from None
        self.created = True

    def write(self, stream: BinaryIO, *, max_bytes: int, total_cap: int) -> str:
        """Copy one upload into the directory; its input reference (``spool:<dir>/<n>``).

        Raises TooLarge past `max_bytes` for this file, LimitExceeded past `total_cap` for the
        request, InsufficientStorage past the quota or the disk's free space.
        """
        if not self.created:
            self._create()
        target = self.path / str(self._files)
        self._files += 1
        written = 0
        try:
            with open(target, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    if written + len(chunk) > max_bytes:
                        raise too_large(max_bytes)
                    if self.bytes + len(chunk) > total_cap:
                        raise LimitExceeded(f"the uploads are larger than {total_cap} bytes")
                    self.spool._reserve(len(chunk))
                    written += len(chunk)
                    self.bytes += len(chunk)
                    out.write(chunk)
        except BaseException as exc:
            # Nothing of a refused file stays on disk or in the count.
            self.spool._release(written)
            self.bytes -= written
            with contextlib.suppress(OSError):
                target.unlink()
            if isinstance(exc, OSError):
                log.error("spool write failed: %s", exc)
                raise InsufficientStorage("job storage is unavailable; try again later") from None
            raise
        return f"{REF_PREFIX}{self.path.name}/{target.name}"

    def write_bytes(self, data: bytes, *, total_cap: int) -> str:
        """Like :meth:`write`, for bytes already in memory (zip entries)."""
        return self.write(io.BytesIO(data), max_bytes=len(data), total_cap=total_cap)

    def commit(self) -> None:
        """The job is stored: its bytes now count through the store; drop the marker."""
        if self._closed:
            return
        self._closed = True
        self.spool._release(self.bytes)
        if self.created:
            with contextlib.suppress(OSError):
                os.unlink(self.path / INCOMPLETE)

    def discard(self) -> None:
        """The request failed: remove everything written."""
        if self._closed:
            return
        self._closed = True
        self.spool._release(self.bytes)
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
