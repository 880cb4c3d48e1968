"""`url=`: download an image over http(s) within one deadline and a byte cap, SSRF-safe.

A :class:`UrlFetcher` owns what downloads share — the bounded DNS pool and the TLS context —
and is owned (started and closed) by the runtime. Connections go through vetted_socket.py, so
every hop of every redirect reaches only addresses the policy allows.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any
from urllib.parse import urljoin

from urllib3 import exceptions as u3exc
from urllib3.util import Timeout, make_headers, parse_url

from bounded_io import read_capped
from captioning.errors import ImageInputError, too_large
from image_input.vetted_socket import (
    Resolver,
    build_ssl_context,
    time_left,
    url_error,
    vetted_pool,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
USER_AGENT = "blip2-caption-service/1.0"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


def _ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context (certifi's bundle unless `cafile`); tests swap this."""
    return build_ssl_context(cafile)


class UrlFetcher:
    """Downloads for `url=`: one per call, sharing a DNS pool and a TLS context."""

    def __init__(self, *, max_bytes: int, timeout: float, allow_private: bool) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.allow_private = allow_private
        self._resolver = Resolver()
        self._tls: ssl.SSLContext | None = None

    def close(self) -> None:
        self._resolver.close()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # loading the CA bundle costs a few ms: only on first HTTPS use
            self._tls = _ssl_context()
        return self._tls

    def fetch(self, url: str) -> bytes:
        """Download `url` (GET, at most 5 redirects) into memory, within the byte cap and timeout.

        The timeout is one deadline for the whole exchange: resolution, every connect, TLS
        handshake, headers and body of every hop. Errors: 400 ``Failed to download image:
        <detail>``; a body over the cap is 413, detected from Content-Length or as soon as the
        streamed body passes it.
        """
        deadline = time.monotonic() + self.timeout
        current = url
        origin_auth: tuple[tuple[str, str, int | None], str] | None = None
        for hop in range(MAX_REDIRECTS + 1):
            target = _parse_target(current)
            origin = (target.scheme, target.host, target.port)
            headers = {
                "User-Agent": USER_AGENT,
                "Accept": "image/*,*/*;q=0.8",
                "Accept-Encoding": "identity",
            }
            if target.auth:
                origin_auth = (origin, target.auth)
            if origin_auth is not None and origin_auth[0] == origin:
                headers.update(make_headers(basic_auth=origin_auth[1]))
            location = self._fetch_one(target, headers, deadline)
            if isinstance(location, bytes):
                return location
            current = urljoin(current, location)
            log.debug("redirect %d to %s://%s", hop + 1, *_safe_origin(current))
        raise url_error("too many redirects")

    def _fetch_one(self, target: Any, headers: dict[str, str], deadline: float) -> bytes | str:
        """One GET: the body as bytes, or the Location (str) of a redirect to follow."""
        response = None
        pool = None
        try:
            left = time_left(deadline)
            pool = vetted_pool(
                target,
                deadline=deadline,
                allow_private=self.allow_private,
                resolver=self._resolver,
                tls=self._tls_context,
            )
            response = pool.urlopen(
                "GET",
                target.request_uri,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                decode_content=True,
                timeout=Timeout(connect=left, read=left),
            )
            status = response.status
            if status in _REDIRECT_STATUSES and response.headers.get("Location"):
                return str(response.headers["Location"])
            if not 200 <= status < 300:
                raise url_error(f"HTTP {status}")
            return _read_body(response, self.max_bytes, deadline)
        except ImageInputError:
            raise
        except Exception as exc:
            raise url_error(_describe(exc, deadline)) from None
        finally:
            if response is not None:
                response.close()
            if pool is not None:
                pool.close()


def fetch_url(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    """One download with a fetcher of its own (tools and tests; the service shares one)."""
    fetcher = UrlFetcher(max_bytes=max_bytes, timeout=timeout, allow_private=allow_private)
    try:
        return fetcher.fetch(url)
    finally:
        fetcher.close()


def _parse_target(url: str) -> Any:
    """Parse and check one hop's URL: http/https with a host; anything else is refused."""
    try:
        parsed = parse_url(url)
    except (u3exc.LocationParseError, ValueError, UnicodeError):
        raise url_error("invalid URL") from None
    if not parsed.scheme:
        raise url_error("invalid URL")
    if parsed.scheme.lower() not in ("http", "https"):
        raise url_error("unsupported URL scheme")
    if not parsed.host or parsed.port == 0:
        raise url_error("invalid URL")
    return parsed


def _safe_origin(url: str) -> tuple[str, str]:
    try:
        p = parse_url(url)
        return p.scheme or "?", p.host or "?"
    except Exception:
        return "?", "?"


def _read_body(response: Any, max_bytes: int, deadline: float) -> bytes:
    """Stream the body into memory, stopping as soon as it passes the cap."""
    declared = response.headers.get("Content-Length")
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if declared is not None and encoding == "identity":
        try:
            if int(declared) > max_bytes:
                raise too_large(max_bytes)
        except ValueError:
            pass

    def read_chunk(_wanted: int) -> bytes:
        time_left(deadline)
        # read1 returns what one socket read (or one bounded decode step) gives.
        return response.read1(_CHUNK, decode_content=True)

    return read_capped(read_chunk, max_bytes, lambda: too_large(max_bytes))


def _describe(exc: BaseException, deadline: float) -> str:
    """A short, fixed reason for a transport failure (never the exception text)."""
    log.debug("URL fetch failed: %r", exc)
    if time.monotonic() >= deadline:
        return "timed out"
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(chain) < 16:  # urllib3 wraps causes in args as well as __context__
        cur = todo.pop()
        if any(cur is seen for seen in chain):
            continue
        chain.append(cur)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
    for kinds, reason in (
        ((TimeoutError, u3exc.TimeoutError), "timed out"),
        ((ssl.SSLCertVerificationError,), "certificate verification failed"),
        ((ssl.SSLError, u3exc.SSLError), "TLS error"),
        ((u3exc.DecodeError,), "could not decode response"),
    ):
        if any(isinstance(e, kinds) for e in chain):
            return reason
    if isinstance(exc, u3exc.HTTPError | OSError):
        return "connection error"
    return "invalid response"
