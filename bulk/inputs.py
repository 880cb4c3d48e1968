"""What a bulk request carries, turned into items: in memory for a batch, spooled for a job.

A bulk request (`/v3/batch`, `/v3/jobs`) names its images in one of three ways, never mixed
with a zip: several uploads, lists of URLs and server paths, or one zip archive (uploaded, or
fetched from a URL). The HTTP edge parses the request into a :class:`BulkRequest`; this module
applies the limits *before* anything is read (item count), while reading (bytes), and turns each
input into an item in input order. Problems of one input (a disallowed file name, an oversized
image, a zip entry that is not an image) become that item's error; problems of the whole request
(too many items, too many bytes, an unsafe archive) refuse it with a domain error.

Job items are stored as :class:`bulk.jobs.NewItem` whose ``input_ref`` says how the worker
reads them: ``url:<url>``, ``file:<path>``, ``spool:<dir>/<n>`` (a spooled upload) or
``error:<message>`` (the item's outcome is already known).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from bulk.archive import ArchiveError, ArchiveLimits, ArchiveTooLarge, SafeZip
from bulk.jobs import MAX_REF_CHARS, MAX_SOURCE_CHARS, NewItem
from captioning.errors import InvalidRequest, LimitExceeded, TooLarge, too_large
from image_input.sources import allowed_filename

if TYPE_CHECKING:
    from bulk.spool import Spool, SpoolDir
    from image_input.sources import ImageReader, ImageSource

URL_REF = "url:"
FILE_REF = "file:"
ERROR_REF = "error:"
NOT_ALLOWED = "File type not allowed"
NO_FILE = "No file selected"
_ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed"})


ZIP_ALONE = "a zip archive must be the only input of a request"


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's name for it and a stream of its bytes."""

    name: str
    stream: BinaryIO = field(repr=False)
    media_type: str = ""

    @property
    def is_zip(self) -> bool:
        return self.name.lower().endswith(".zip") or self.media_type.lower() in _ZIP_TYPES


@dataclass
class BulkRequest:
    """The inputs of one bulk request, as the HTTP edge parsed them."""

    uploads: list[Upload] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    archive: Upload | None = None
    archive_url: str | None = None

    def check_shape(self) -> None:
        """At least one input; a zip archive comes alone."""
        direct = len(self.uploads) + len(self.urls) + len(self.files)
        archives = (self.archive is not None) + (self.archive_url is not None)
        if archives > 1 or (archives and direct):
            raise InvalidRequest(ZIP_ALONE)
        if not archives and not direct:
            raise InvalidRequest(
                "no images: send multipart `file` parts, a JSON body with `urls` and/or "
                "`files`, or one zip archive"
            )


@dataclass(frozen=True)
class BulkLimits:
    """How much one request may carry."""

    max_items: int
    max_bytes: int  # all uploads (or the zip) together
    max_file_bytes: int  # one image

    def archive_limits(self) -> ArchiveLimits:
        # Directories count as entries in the archive's own bound; files are counted below.
        return ArchiveLimits(
            max_entries=2 * self.max_items + 64,
            max_total_bytes=self.max_bytes,
            max_entry_bytes=self.max_file_bytes,
        )


@dataclass(frozen=True)
class BatchItem:
    """One input of a batch: a source to caption, or the reason it cannot be."""

    source: str
    image: ImageSource | None = None
    error: str | None = None


ArchiveFetch = Callable[[str], bytes]


def count_direct(request: BulkRequest, limits: BulkLimits) -> None:
    """Refuse too many uploads, URLs and paths before any is read."""
    count = len(request.uploads) + len(request.urls) + len(request.files)
    if count > limits.max_items:
        raise LimitExceeded(f"too many images: at most {limits.max_items} per request, got {count}")


# -- batches: in memory ------------------------------------------------------------------------


def batch_items(
    request: BulkRequest, limits: BulkLimits, reader: ImageReader, fetch_archive: ArchiveFetch
) -> list[BatchItem]:
    """The batch's items in input order (uploads read here, URLs and paths when captioned)."""
    request.check_shape()
    if request.archive is not None or request.archive_url is not None:
        entries = _archive_entries(request, limits, fetch_archive)
        return [_batch_entry(entry, reader) for entry in entries]
    count_direct(request, limits)
    items: list[BatchItem] = []
    used = 0
    for upload in request.uploads:
        problem = _upload_problem(upload)
        if problem:
            items.append(BatchItem(upload.name, error=problem))
            continue
        data = upload.stream.read(limits.max_file_bytes + 1)
        if len(data) > limits.max_file_bytes:
            items.append(BatchItem(upload.name, error=too_large(limits.max_file_bytes).message))
            continue
        used += len(data)
        if used > limits.max_bytes:
            raise LimitExceeded(f"the uploads are larger than {limits.max_bytes} bytes")
        items.append(BatchItem(upload.name, reader.upload(data, upload.name)))
    items += [BatchItem(url, reader.url(url)) for url in request.urls]
    items += [BatchItem(path, reader.file(path)) for path in request.files]
    return items


def _batch_entry(entry: _Entry, reader: ImageReader) -> BatchItem:
    if entry.data is None:
        return BatchItem(entry.source, error=entry.error)
    return BatchItem(entry.source, reader.upload(entry.data, entry.source))


# -- jobs: spooled -----------------------------------------------------------------------------


def job_items(
    request: BulkRequest, limits: BulkLimits, spool_dir: SpoolDir, fetch_archive: ArchiveFetch
) -> list[NewItem]:
    """The job's items in input order; uploads and zip entries are written to `spool_dir`."""
    request.check_shape()
    if request.archive is not None or request.archive_url is not None:
        items = []
        for entry in _archive_entries(request, limits, fetch_archive):
            if entry.data is None:
                items.append(_error_item(entry.source, entry.error or "unreadable entry"))
            else:
                ref = spool_dir.write_bytes(entry.data, total_cap=limits.max_bytes)
                items.append(NewItem(_source(entry.source), ref))
        return items
    count_direct(request, limits)
    items = [_spooled_upload(upload, limits, spool_dir) for upload in request.uploads]
    items += [NewItem(_source(url), _ref(URL_REF, url, "URL")) for url in request.urls]
    items += [NewItem(_source(path), _ref(FILE_REF, path, "path")) for path in request.files]
    return items


def _spooled_upload(upload: Upload, limits: BulkLimits, spool_dir: SpoolDir) -> NewItem:
    problem = _upload_problem(upload)
    if problem:
        return _error_item(upload.name, problem)
    try:
        ref = spool_dir.write(
            upload.stream, max_bytes=limits.max_file_bytes, total_cap=limits.max_bytes
        )
    except TooLarge as exc:
        return _error_item(upload.name, exc.message)
    return NewItem(_source(upload.name), ref)


def _error_item(source: str, message: str) -> NewItem:
    return NewItem(_source(source), ERROR_REF + message[: MAX_REF_CHARS - len(ERROR_REF)])


def _source(name: str) -> str:
    return name if len(name) <= MAX_SOURCE_CHARS else name[: MAX_SOURCE_CHARS - 3] + "..."


def _ref(prefix: str, value: str, what: str) -> str:
    if len(prefix) + len(value) > MAX_REF_CHARS:
        raise InvalidRequest(f"a {what} is longer than {MAX_REF_CHARS - len(prefix)} characters")
    return prefix + value


def item_source(ref: str, reader: ImageReader, spool: Spool, name: str) -> ImageSource | str:
    """How the worker reads a stored item: an ImageSource, or the item's error message."""
    if ref.startswith(ERROR_REF):
        return ref[len(ERROR_REF) :]
    if ref.startswith(URL_REF):
        return reader.url(ref[len(URL_REF) :])
    if ref.startswith(FILE_REF):
        return reader.file(ref[len(FILE_REF) :])
    path = spool.path_of(ref)
    if path is None:
        return "internal error: unknown item reference"
    return reader.upload(lambda: _read_spooled(path, reader.max_bytes), name)


class SpooledFileMissing(Exception):
    """A job's spooled upload is gone (deleted from under the service)."""


def _read_spooled(path: Path, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except FileNotFoundError:
        raise SpooledFileMissing(str(path)) from None
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


# -- zip archives ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    source: str
    data: bytes | None
    error: str | None


def _archive_entries(
    request: BulkRequest, limits: BulkLimits, fetch_archive: ArchiveFetch
) -> Iterator[_Entry]:
    """Each file entry of the request's archive, one at a time, after the whole archive passed
    its checks (a job spools them as they come: never the whole archive in memory)."""
    if request.archive is not None:
        name, source = request.archive.name or "archive.zip", request.archive.stream
    else:
        assert request.archive_url is not None
        name, source = request.archive_url, fetch_archive(request.archive_url)
    try:
        with SafeZip(source, limits.archive_limits()) as archive:
            if not len(archive):
                raise InvalidRequest("zip archive refused: it has no files")
            if len(archive) > limits.max_items:
                raise LimitExceeded(
                    f"too many images: the archive has {len(archive)} files, at most "
                    f"{limits.max_items} per request"
                )
            for item in archive.items():
                yield _Entry(f"{name}: {item.name}", item.data, item.error)
    except ArchiveTooLarge as exc:
        raise LimitExceeded(f"zip archive refused: {exc.message}") from None
    except ArchiveError as exc:
        raise InvalidRequest(f"zip archive refused: {exc.message}") from None


def _upload_problem(upload: Upload) -> str | None:
    if not upload.name:
        return NO_FILE
    if not allowed_filename(upload.name):
        return NOT_ALLOWED
    return None
