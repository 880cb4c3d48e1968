"""`file=`: read an image file the server can see, within a byte cap and FILE_ROOTS.

Directories, devices, FIFOs and sockets are refused without opening them (a FIFO can never hang
a worker); with FILE_ROOTS the resolved path must lie inside a root, and the descriptor really
opened is checked again, so a path re-pointed between check and open is caught.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from bounded_io import read_capped
from captioning.errors import AccessDenied, ImageInputError, too_large
from image_input.decode import FILE_ERROR

log = logging.getLogger(__name__)


def read_file(path: str, *, max_bytes: int, roots: tuple[Path, ...] | None) -> bytes:
    """Read a regular file the server can see, within `max_bytes`.

    With `roots` set, the path (after resolving ``..`` and symlinks) must lie inside one of them
    or the caller gets 403 ``Access denied: <path>`` (whether or not it exists). ``None`` keeps
    the reference behaviour: any readable path. Directories, devices, FIFOs and sockets are
    refused without opening them, so a FIFO can never hang the worker.
    """
    not_found = ImageInputError(f"File not found: {path}")
    if not path or "\x00" in path:
        raise not_found
    open_path = path
    if roots is not None:
        real = os.path.realpath(path)
        if not _inside(real, roots):
            log.info("file= outside FILE_ROOTS refused")
            raise AccessDenied(f"Access denied: {path}")
        open_path = real  # open what we vetted, not a name that could be re-pointed
    try:
        st = os.stat(open_path)
    except (OSError, ValueError):
        raise not_found from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(f"{FILE_ERROR}: not a regular file")
    if st.st_size > max_bytes:
        raise too_large(max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    if roots is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(open_path, flags)
    except FileNotFoundError:
        raise not_found from None
    except PermissionError:
        raise ImageInputError(f"{FILE_ERROR}: permission denied") from None
    except OSError as exc:
        log.debug("open failed: %r", exc)
        if exc.errno == errno.ELOOP:  # swapped for a symlink since we resolved it
            raise AccessDenied(f"Access denied: {path}") from None
        raise ImageInputError(f"{FILE_ERROR}: could not read file") from None
    try:
        st = os.fstat(fd)  # the object really opened, in case the name changed meanwhile
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(f"{FILE_ERROR}: not a regular file")
        if roots is not None and not _fd_inside(fd, roots):
            raise AccessDenied(f"Access denied: {path}")
        if st.st_size > max_bytes:
            raise too_large(max_bytes)
        return read_capped(
            lambda wanted: os.read(fd, min(1 << 20, wanted)),
            max_bytes,
            lambda: too_large(max_bytes),
        )
    except OSError as exc:
        log.debug("read failed: %r", exc)
        raise ImageInputError(f"{FILE_ERROR}: could not read file") from None
    finally:
        os.close(fd)


def _inside(real: str, roots: tuple[Path, ...]) -> bool:
    target = Path(real)
    return any(target.is_relative_to(os.path.realpath(root)) for root in roots)


def _fd_inside(fd: int, roots: tuple[Path, ...]) -> bool:
    """Where the open descriptor really points (Linux /proc); True where we cannot tell."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return _inside(real, roots)
