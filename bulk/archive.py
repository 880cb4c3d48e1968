"""Take the images out of an untrusted zip archive without being hurt by it.

Peer services unpack whatever they are sent. Here every whole-archive danger (traversal or
absolute names, symlinks, nested archives, encryption, duplicate names, entry-count and
compression bombs) is refused from the central directory and a bounded peek at each entry,
*before* any entry is handed out; sizes are enforced again while reading, because the sizes in
the headers are only claims. Problems of one entry alone (not an image, too big, corrupt,
unsupported compression) become per-item errors, so the rest of the archive still gets captioned.

Nothing is ever written to disk: entries are returned as bytes, and callers that spool them
must name the files themselves (entry names are for display only).
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import unicodedata
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

#: What a caller may hand over: the archive's bytes, a path to it, or a seekable binary file.
ZipSource = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO

_READ_CHUNK = 64 * 1024
_PEEK_BYTES = 512  # enough for every magic number below (tar's sits at offset 257)
_READABLE_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_DRIVE = re.compile(r"^[A-Za-z]:")
_ARCHIVE_SUFFIXES = (
    ".zip", ".jar", ".apk", ".tar", ".tgz", ".gz", ".tbz", ".tbz2", ".bz2", ".txz", ".xz",
    ".lz", ".lzma", ".zst", ".z", ".7z", ".rar", ".cab", ".iso",
)  # fmt: skip
_ARCHIVE_MAGIC = (
    b"PK\x03\x04",  # zip (and jar, apk, docx ...)
    b"PK\x05\x06",  # empty zip
    b"PK\x07\x08",  # spanned zip
    b"\x1f\x8b",  # gzip
    b"\x1f\x9d",  # compress (.Z)
    b"BZh",  # bzip2
    b"\xfd7zXZ\x00",  # xz
    b"\x28\xb5\x2f\xfd",  # zstandard
    b"7z\xbc\xaf\x27\x1c",  # 7-Zip
    b"Rar!\x1a\x07",  # RAR 4 and 5
    b"LZIP",  # lzip
    b"MSCF",  # cabinet
)
_TAR_MAGIC_OFFSET = 257  # "ustar" in a tar header
# The formats image decoding accepts (image_input/decode.py DECODE_FORMATS), by magic number.
_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG (and MPO)
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)
# Entry numbers in zipfile's end-of-central-directory record (zip64 values already applied).
_ECD_ENTRIES_TOTAL = 4
_ECD_SIZE = 5


class ArchiveError(Exception):
    """The whole archive is refused (HTTP 400); `message` is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ArchiveTooLarge(ArchiveError):
    """The archive exceeds a size limit: entries, bytes or compression ratio (HTTP 413)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds for one archive. Sizes are uncompressed bytes."""

    max_entries: int = 10_000  # every entry in the central directory, directories included
    max_total_bytes: int = 1 << 30  # all image entries together
    max_entry_bytes: int = 32 << 20  # one entry; larger ones become per-item errors
    max_ratio: float = 100.0  # uncompressed / compressed, above which an entry is a bomb
    ratio_floor_bytes: int = 1 << 20  # entries up to this size skip the ratio check
    max_name_chars: int = 1024


@dataclass(frozen=True)
class ArchiveItem:
    """One file entry, in archive order: either its bytes or a client-safe error."""

    index: int  # position among the archive's file entries (directories are not counted)
    name: str
    data: bytes | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class _Planned:
    info: zipfile.ZipInfo
    error: str | None = None


def read_zip(source: ZipSource, limits: ArchiveLimits) -> list[ArchiveItem]:
    """Every file entry of the archive, in order; raises :class:`ArchiveError` if refused.

    Holds up to ``limits.max_total_bytes`` in memory; use :class:`SafeZip` to stream instead.
    """
    with SafeZip(source, limits) as archive:
        return list(archive.items())


class SafeZip:
    """A zip archive that passed every whole-archive check (done in the constructor).

    ``items()`` then reads the entries one at a time, so a caller can spool them to disk
    without holding the whole archive's contents in memory.
    """

    def __init__(self, source: ZipSource, limits: ArchiveLimits) -> None:
        self.limits = limits
        self._file, self._owned = _open_source(source)
        try:
            _check_end_record(self._file, limits)
            self._zip = _open_zip(self._file)
            self._plan = _check_entries(self._zip, limits)
            self._plan = [_peek(self._zip, planned) for planned in self._plan]
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        """How many items ``items()`` yields."""
        return len(self._plan)

    @property
    def names(self) -> list[str]:
        return [planned.info.filename for planned in self._plan]

    def items(self) -> Iterator[ArchiveItem]:
        """Each file entry in archive order, its bytes read with the limits enforced again."""
        used = 0
        for index, planned in enumerate(self._plan):
            name = planned.info.filename
            if planned.error is not None:
                yield ArchiveItem(index, name, error=planned.error)
                continue
            data, error = _read_entry(self._zip, planned.info, self.limits, used)
            used += len(data or b"")
            yield ArchiveItem(index, name, data=data, error=error)

    def close(self) -> None:
        zip_file = getattr(self, "_zip", None)
        if zip_file is not None:
            zip_file.close()
        if self._owned:
            self._file.close()


def _open_source(source: ZipSource) -> tuple[BinaryIO, bool]:
    """A seekable binary file for `source`, and whether we opened it (and must close it)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source), True
    if isinstance(source, str | os.PathLike):
        try:
            return open(source, "rb"), True  # noqa: SIM115 - closed by SafeZip.close
        except OSError:
            raise ArchiveError("the archive could not be opened") from None
    return source, False


def _check_end_record(file: BinaryIO, limits: ArchiveLimits) -> None:
    """Refuse entry-count bombs from the end record, before zipfile parses every entry.

    zipfile builds one object per central-directory entry before anyone can count them, so a
    small archive declaring millions of entries must be stopped here. This reads the record with
    zipfile's own function, so both agree on which record counts.
    """
    try:
        record = zipfile._EndRecData(file)  # private, unchanged since Python 2.6
    except Exception as exc:  # malformed input makes the parser raise many types
        log.debug("zip end record unreadable: %r", exc)
        record = None
    if not record:
        raise ArchiveError("not a zip archive")
    entries, directory_size = record[_ECD_ENTRIES_TOTAL], record[_ECD_SIZE]
    if entries > limits.max_entries:
        raise ArchiveTooLarge(f"the archive has {entries} entries; at most {limits.max_entries}")
    # An entry takes 46 bytes plus its name and extras; anything far beyond is not a real list.
    if directory_size > limits.max_entries * (46 + limits.max_name_chars + 1024) + 65536:
        raise ArchiveTooLarge("the archive's list of entries is too large")


def _open_zip(file: BinaryIO) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(file)
    except Exception as exc:
        log.debug("zip archive unreadable: %r", exc)
        raise ArchiveError("not a valid zip archive") from None


def _check_entries(archive: zipfile.ZipFile, limits: ArchiveLimits) -> list[_Planned]:
    """Whole-archive checks on the central directory, and the entries to read, in order."""
    infos = archive.infolist()
    if len(infos) > limits.max_entries:
        raise ArchiveTooLarge(f"the archive has {len(infos)} entries; at most {limits.max_entries}")
    seen: set[str] = set()
    plan: list[_Planned] = []
    declared = 0
    for info in infos:
        key = _checked_name(info, limits)
        if key is None:
            continue  # a directory
        if key in seen:
            raise ArchiveError(f"the archive contains {_shown(info.filename)} twice")
        seen.add(key)
        if _is_metadata(key):
            continue
        planned = _plan_entry(info, limits)
        if planned.error is None:
            declared += info.file_size
            if declared > limits.max_total_bytes:
                raise ArchiveTooLarge(
                    f"the archive expands to more than {limits.max_total_bytes} bytes"
                )
        plan.append(planned)
    return plan


def _checked_name(info: zipfile.ZipInfo, limits: ArchiveLimits) -> str | None:
    """Refuse unsafe entries; the normalised name, or None for a directory to skip."""
    name = info.filename
    problem = _name_problem(name, limits.max_name_chars)
    if problem:
        raise ArchiveError(f"entry {_shown(name)}: {problem}")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveError(f"entry {_shown(name)}: symbolic links are not allowed")
    if info.is_dir() or stat.S_ISDIR(mode):
        return None
    if info.flag_bits & 0x1:
        raise ArchiveError(f"entry {_shown(name)}: encrypted entries are not supported")
    if name.lower().endswith(_ARCHIVE_SUFFIXES):
        raise ArchiveError(f"entry {_shown(name)}: archives inside archives are not allowed")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise ArchiveError(f"entry {_shown(name)}: the name has no file name")
    return unicodedata.normalize("NFC", "/".join(parts))


def _name_problem(name: str, max_chars: int) -> str | None:
    """Why an entry name is unsafe to accept, or None."""
    if not name:
        return "an empty name"
    if len(name) > max_chars:
        return f"the name is longer than {max_chars} characters"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "control characters in the name"
    if "\\" in name:
        return "backslashes are not allowed in names"
    if name.startswith("/") or _DRIVE.match(name):
        return "absolute paths are not allowed"
    if ".." in name.split("/"):
        return "path traversal ('..') is not allowed"
    return None


def _is_metadata(key: str) -> bool:
    """Files macOS adds to every zip it makes, skipped like directories."""
    return key.startswith("__MACOSX/") or key.rsplit("/", 1)[-1] == ".DS_Store"


def _plan_entry(info: zipfile.ZipInfo, limits: ArchiveLimits) -> _Planned:
    """Bomb check (whole archive), then this entry's own problems (per item)."""
    if info.file_size > limits.ratio_floor_bytes and info.file_size > limits.max_ratio * max(
        info.compress_size, 1
    ):
        raise ArchiveTooLarge(
            f"entry {_shown(info.filename)} expands more than {limits.max_ratio:g} times "
            "(a compression bomb)"
        )
    if info.compress_type not in _READABLE_METHODS:
        return _Planned(info, "unsupported compression method")
    if info.file_size > limits.max_entry_bytes:
        return _Planned(info, f"larger than {limits.max_entry_bytes} bytes")
    if info.file_size == 0:
        return _Planned(info, "empty file")
    return _Planned(info)


def _peek(archive: zipfile.ZipFile, planned: _Planned) -> _Planned:
    """Refuse nested archives by content; mark entries that are not images as item errors."""
    if planned.error is not None:
        return planned
    try:
        with archive.open(planned.info) as entry:
            head = entry.read(_PEEK_BYTES)
    except Exception as exc:  # bad CRC, bad deflate stream, mismatched local header ...
        log.debug("zip entry %r unreadable: %r", planned.info.filename, exc)
        return _Planned(planned.info, "corrupt or unreadable entry")
    if head.startswith(_ARCHIVE_MAGIC) or head[_TAR_MAGIC_OFFSET:].startswith(b"ustar"):
        raise ArchiveError(
            f"entry {_shown(planned.info.filename)}: archives inside archives are not allowed"
        )
    if not _is_image(head):
        return _Planned(planned.info, "not an image (JPEG, PNG, GIF, BMP, WEBP or TIFF)")
    return planned


def _is_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _read_entry(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits, used: int
) -> tuple[bytes | None, str | None]:
    """Read one entry, never more than its share of the limits, whatever its header says."""
    cap = min(limits.max_entry_bytes, limits.max_total_bytes - used)
    limit = min(info.file_size, cap)
    try:
        with archive.open(info) as entry:
            data = _read_at_most(entry, limit)
    except Exception as exc:
        log.debug("zip entry %r unreadable: %r", info.filename, exc)
        return None, "corrupt or unreadable entry"
    if data is not None:
        return data, None
    if limit == info.file_size:  # more bytes than the header declared
        return None, "corrupt or unreadable entry"
    if cap == limits.max_entry_bytes:
        return None, f"larger than {limits.max_entry_bytes} bytes"
    raise ArchiveTooLarge(f"the archive expands to more than {limits.max_total_bytes} bytes")


def _read_at_most(entry: BinaryIO, limit: int) -> bytes | None:
    """The entry's bytes, read in small steps; None as soon as there are more than `limit`.

    Small steps matter: asked for n bytes at once, zipfile inflates up to n before trimming.
    """
    buffer = bytearray()
    while len(buffer) <= limit:
        chunk = entry.read(min(_READ_CHUNK, limit + 1 - len(buffer)))
        if not chunk:
            return bytes(buffer)
        buffer += chunk
    return None


def _shown(name: str) -> str:
    """An entry name as it may appear in a client message: quoted, escaped, shortened."""
    short = name if len(name) <= 120 else name[:120] + "..."
    return repr(short)
