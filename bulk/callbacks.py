"""A job's `callback_url`: checked when the job is created, POSTed when it ends.

The client chooses the address, so it gets the same SSRF guard as `url=` downloads: connections
go through image_input's vetted sockets (only addresses the policy allows, the peer checked
after connecting, every hop bounded by one deadline), redirects are not followed, and the
response body is never read beyond its status line and headers. One call is one POST of the job's
status as JSON within TIMEOUT; retries and their backoff are the caller's (bulk.upkeep).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import Any

from urllib3 import exceptions as u3exc
from urllib3.util import Timeout, parse_url

from captioning.errors import ImageInputError, InvalidRequest
from image_input.vetted_socket import (
    Resolver,
    build_ssl_context,
    resolve_allowed,
    time_left,
    vetted_pool,
)

log = logging.getLogger(__name__)

USER_AGENT = "blip2-caption-service/1.0 (job callback)"
MAX_URL_CHARS = 2048


def check_callback_url(url: str, *, allow_private: bool, timeout: float) -> str:
    """The URL, stripped, if it may be called back; InvalidRequest saying why not otherwise.

    The address is checked now (a literal or a resolved name) so a forbidden target is refused
    at once; it is checked again at every call, since names can change.
    """
    url = url.strip()
    if not url or len(url) > MAX_URL_CHARS:
        raise InvalidRequest(
            f"callback_url must be an http(s) URL of at most {MAX_URL_CHARS} characters"
        )
    target = _parse(url)
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        resolve_allowed(target.host, port, allow_private=allow_private, timeout=timeout)
    except ImageInputError as exc:
        reason = exc.message.rsplit(": ", 1)[-1]
        raise InvalidRequest(f"callback_url refused: {reason}") from None
    return url


def _parse(url: str) -> Any:
    try:
        target = parse_url(url)
    except (u3exc.LocationParseError, ValueError, UnicodeError):
        raise InvalidRequest("callback_url is not a valid URL") from None
    if (target.scheme or "").lower() not in ("http", "https") or not target.host:
        raise InvalidRequest("callback_url must be an http or https URL with a host")
    if target.port == 0:
        raise InvalidRequest("callback_url is not a valid URL")
    return target


class CallbackSender:
    """POSTs callbacks over vetted connections; owns its DNS pool and TLS context."""

    def __init__(self, *, timeout: float, allow_private: bool) -> None:
        self.timeout = timeout
        self.allow_private = allow_private
        self._resolver = Resolver(max_workers=2)
        self._tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:  # loading the CA bundle costs a few ms: only on first HTTPS use
            self._tls = build_ssl_context()
        return self._tls

    def close(self) -> None:
        self._resolver.close()

    def post(self, url: str, body: dict[str, Any]) -> str | None:
        """One POST of `body` as JSON; None when the receiver answered 2xx, else why not."""
        deadline = time.monotonic() + self.timeout
        try:
            target = _parse(url)
        except InvalidRequest as exc:
            return exc.message
        data = json.dumps(body, separators=(",", ":")).encode()
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
                "POST",
                target.request_uri,
                body=data,
                headers={"Content-Type": "application/json", "User-Agent": USER_AGENT},
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
                timeout=Timeout(connect=left, read=left),
            )
            status = response.status
            response.close()
        except ImageInputError as exc:
            return exc.message.rsplit(": ", 1)[-1]
        except Exception as exc:
            log.debug("callback to %s failed: %r", target.host, exc)
            return "timed out" if time.monotonic() >= deadline else "connection error"
        finally:
            if pool is not None:
                pool.close()
        return None if 200 <= status < 300 else f"HTTP {status}"
