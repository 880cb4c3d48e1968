"""Which image a request carries, picked as CONTRACT.md says: raw body, multipart `file`, then
the `url=` / `file=` query. Returns an `ImageSource`; nothing is read or downloaded here."""

from __future__ import annotations

from flask import Request
from werkzeug.datastructures import FileStorage

from bounded_io import read_capped
from captioning.errors import InvalidRequest, too_large
from image_input.sources import ImageReader, ImageSource, allowed_filename

BODY_CHUNK = 256 * 1024
RAW_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "application/octet-stream"})


def image_source(request: Request, reader: ImageReader) -> ImageSource:
    if request.method == "POST":
        media_type = (request.mimetype or "").lower()
        if media_type in RAW_TYPES:
            if not request.content_length:
                raise InvalidRequest("No image body provided")
            # Read when the pipeline has a decode slot, so waiting bodies stay in waitress's
            # spool files rather than in memory.
            return reader.upload(lambda: _read_body(request, reader.max_bytes))
        if media_type == "multipart/form-data" and "file" in request.files:
            upload = request.files["file"]
            if not upload.filename:
                raise InvalidRequest("No file selected")
            if not allowed_filename(upload.filename):
                raise InvalidRequest("File type not allowed")
            return reader.upload(lambda: _read_upload(upload, reader.max_bytes), upload.filename)
    url = request.args.get("url", "").strip()
    path = request.args.get("file", "").strip()
    if url and path:
        raise InvalidRequest("Cannot provide both url and file parameters")
    if url:
        return reader.url(url)
    if path:
        return reader.file(path)
    raise InvalidRequest("Must provide either url or file parameter, or POST a file")


def _read_body(request: Request, max_bytes: int) -> bytes:
    # In pieces: Werkzeug's limited stream allocates whatever size a read asks for, and one
    # read of MAX_FILE_SIZE + 1 cost ~20 ms per request however small the image.
    stream = request.stream
    data = read_capped(
        lambda want: stream.read(min(want, BODY_CHUNK)), max_bytes, lambda: too_large(max_bytes)
    )
    if not data:
        raise InvalidRequest("No image body provided")
    return data


def _read_upload(upload: FileStorage, max_bytes: int) -> bytes:
    data = upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data
