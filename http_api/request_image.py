"""Which image a request carries, picked as CONTRACT.md says: raw body, multipart `file`, then
the `url=` / `file=` query. Returns an `ImageSource`; nothing is read or downloaded here."""

from __future__ import annotations

from flask import Request

from captioning.errors import InvalidRequest, too_large
from image_input.sources import ImageReader, ImageSource, allowed_filename

RAW_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "application/octet-stream"})


def image_source(request: Request, reader: ImageReader) -> ImageSource:
    if request.method == "POST":
        media_type = (request.mimetype or "").lower()
        if media_type in RAW_TYPES:
            data = request.get_data(cache=False)
            if not data:
                raise InvalidRequest("No image body provided")
            return reader.upload(data)
        if media_type == "multipart/form-data" and "file" in request.files:
            upload = request.files["file"]
            if not upload.filename:
                raise InvalidRequest("No file selected")
            if not allowed_filename(upload.filename):
                raise InvalidRequest("File type not allowed")
            data = upload.read(reader.max_bytes + 1)
            if len(data) > reader.max_bytes:
                raise too_large(reader.max_bytes)
            return reader.upload(data, upload.filename)
    url = request.args.get("url", "").strip()
    path = request.args.get("file", "").strip()
    if url and path:
        raise InvalidRequest("Cannot provide both url and file parameters")
    if url:
        return reader.url(url)
    if path:
        return reader.file(path)
    raise InvalidRequest("Must provide either url or file parameter, or POST a file")
