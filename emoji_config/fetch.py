"""One conditional download of a config file, bounded in time and size.

`requests` brings proxies, TLS and redirects; we read the body with ``read1`` (whatever one
socket read returns) so the overall deadline is checked often even when a server drips bytes.
``file://`` URLs are read from disk, which lets an operator point at their own files.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3

from bounded_io import read_capped, remaining

USER_AGENT = "blip2-caption-service emoji-config"
CHUNK_BYTES = 64 * 1024


class FetchError(Exception):
    """The download failed (network, HTTP status, size, deadline); the message says how."""


@dataclass(frozen=True)
class Fetched:
    """Result of a fetch: new bytes (with their validators), or "not modified" (data is None)."""

    data: bytes | None
    etag: str | None = None
    last_modified: str | None = None

    @property
    def not_modified(self) -> bool:
        return self.data is None


def _remaining(deadline: float) -> float:
    return remaining(deadline, lambda: FetchError("timed out"))


def _fetch_file(url: str, max_bytes: int) -> Fetched:
    path = Path(url2pathname(unquote(urlsplit(url).path)))
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise FetchError(f"{path} is larger than {max_bytes} bytes")
    return Fetched(data)


def fetch(
    url: str,
    *,
    deadline: float,
    max_bytes: int,
    etag: str | None = None,
    last_modified: str | None = None,
    cancel: threading.Event | None = None,
) -> Fetched:
    """GET `url`, sending `etag`/`last_modified` as validators; finish by `deadline`.

    `deadline` is a `time.monotonic()` instant. Raises FetchError on any failure.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _fetch_file(url, max_bytes)
    if scheme not in ("http", "https"):
        raise FetchError(f"unsupported URL scheme {scheme!r}")
    headers = {"User-Agent": USER_AGENT}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    left = _remaining(deadline)
    try:
        with requests.get(url, headers=headers, timeout=(left, left), stream=True) as response:
            if response.status_code == 304 and (etag or last_modified):
                return Fetched(None, etag, last_modified)
            if response.status_code != 200:
                raise FetchError(f"HTTP {response.status_code} {response.reason or ''}".strip())
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"Content-Length {declared} exceeds {max_bytes} bytes")

            def read_chunk(_wanted: int) -> bytes:
                _remaining(deadline)
                if cancel is not None and cancel.is_set():
                    raise FetchError("cancelled")
                return response.raw.read1(CHUNK_BYTES, decode_content=True)

            body = read_capped(
                read_chunk, max_bytes, lambda: FetchError(f"body exceeds {max_bytes} bytes")
            )
            return Fetched(
                body,
                response.headers.get("ETag"),
                response.headers.get("Last-Modified"),
            )
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        # urllib3 errors come from reading `response.raw` directly (timeouts, truncated bodies).
        raise FetchError(f"{type(exc).__name__}: {exc}") from None
