"""Where an image comes from: an upload, a `url=` download or a `file=` path.

Callers (the analyze and batch routes, the job worker, the CLI) describe their input as an
:class:`ImageSource`; the pipeline reads it when it is ready to work, so a loading service
answers 503 before it downloads anything. :class:`ImageReader` binds the service's limits
(MAX_FILE_SIZE, TIMEOUT, ALLOW_PRIVATE_URLS, FILE_ROOTS) once and owns the URL fetcher.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from captioning.errors import Overloaded
from image_input.decode import BODY_ERROR, FILE_ERROR, URL_ERROR
from image_input.file_read import read_file
from image_input.url_fetch import UrlFetcher

if TYPE_CHECKING:
    from settings import Settings

#: Filename extensions accepted for multipart uploads (the reference's rule).
ALLOWED_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "bmp", "webp"})

SourceKind = Literal["upload", "url", "file"]
_PREFIXES: dict[str, str] = {"upload": BODY_ERROR, "url": URL_ERROR, "file": FILE_ERROR}


def allowed_filename(name: str) -> bool:
    """The reference's upload rule: the last extension, case-insensitive, is in the allow-list."""
    return "." in name and name.rsplit(".", 1)[1].lower() in ALLOWED_EXTENSIONS


@dataclass(frozen=True)
class ImageSource:
    """One image to caption: what kind of input, the caller's name for it, how to read it."""

    kind: SourceKind
    name: str
    read: Callable[[], bytes] = field(repr=False, compare=False)

    @property
    def local(self) -> bool:
        """Bytes already here (upload, file) rather than to be downloaded."""
        return self.kind != "url"

    @property
    def error_prefix(self) -> str:
        """The contract's wording for decode errors of this kind of input."""
        return _PREFIXES[self.kind]


class ImageReader:
    """Makes sources bound to the service's limits; owns the shared URL fetcher."""

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.max_file_size
        self.roots = settings.file_roots
        self.download_wait = settings.timeout
        # Each download holds up to MAX_FILE_SIZE in memory: bound how many run at once.
        self._downloads = threading.BoundedSemaphore(settings.max_downloads)
        self.fetcher = UrlFetcher(
            max_bytes=settings.max_file_size,
            timeout=settings.timeout,
            allow_private=settings.allow_private_urls,
        )

    def upload(self, data: bytes | Callable[[], bytes], name: str = "") -> ImageSource:
        """Bytes, or a callable that reads them when the pipeline is ready (a request stream)."""
        read = data if callable(data) else (lambda: data)
        return ImageSource("upload", name, read)

    def url(self, url: str) -> ImageSource:
        return ImageSource("url", url, lambda: self._download(url))

    def _download(self, url: str) -> bytes:
        if not self._downloads.acquire(timeout=self.download_wait):
            raise Overloaded("Server busy: too many downloads in progress, retry shortly")
        try:
            return self.fetcher.fetch(url)
        finally:
            self._downloads.release()

    def file(self, path: str) -> ImageSource:
        return ImageSource(
            "file", path, lambda: read_file(path, max_bytes=self.max_bytes, roots=self.roots)
        )

    def close(self) -> None:
        self.fetcher.close()
