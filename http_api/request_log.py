"""Request ids and the access log: every request gets an id, every response echoes it, every
log line of the request carries it, and one access line per request says what happened.

An integrator sends ``X-Request-ID`` (a proxy or the orchestrator may already have one) and can
find the service's lines for that call; without one (or with one that is not 1-128 visible ASCII
characters, which could forge log lines) the service makes one (uuid4 hex). The id is bound for
the request's waitress thread in `log_format`'s context variable from the first hook to the
last (teardown), so lines logged anywhere in that thread carry it.

The access line goes to the ``blip2.access`` logger at INFO with the fields as ``extra=``
(keys of the JSON object with ``LOG_FORMAT=json``): method, path, status, duration_ms, bytes,
cached. The path never includes the query string (``url=`` may carry credentials or signed
tokens) and is percent-encoded, so no client can put a line break into the log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from urllib.parse import quote

from flask import Flask, Response, g, request

from log_format import bind_request_id, unbind_request_id

HEADER = "X-Request-ID"
ACCESS_LOGGER = "blip2.access"
MAX_ID_LENGTH = 128
MAX_LOGGED_PATH = 512
_VALID_ID = re.compile(rf"[!-~]{{1,{MAX_ID_LENGTH}}}")  # visible ASCII, no spaces
_PATH_SAFE = "/:@!$&'()*+,;=-._~"

access_log = logging.getLogger(ACCESS_LOGGER)


def accept_request_id(raw: str | None) -> str:
    """The client's id when it is 1-128 visible ASCII characters, else a new uuid4 hex."""
    if raw is not None and _VALID_ID.fullmatch(raw):
        return raw
    return uuid.uuid4().hex


def register(app: Flask) -> None:
    """Install the hooks. Call before any other hook is registered, so the id is bound first
    and the access line (after_request hooks run in reverse) sees the final response."""
    app.before_request(_begin)
    app.after_request(_finish)
    app.teardown_request(_end)


def _begin() -> None:
    request_id = accept_request_id(request.headers.get(HEADER))
    g.request_id = request_id
    g.request_id_token = bind_request_id(request_id)
    g.access_started = time.perf_counter()


def _finish(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id is None:  # our before_request never ran (should not happen)
        return response
    response.headers[HEADER] = request_id
    _log_access(response)
    return response


def _end(_exc: BaseException | None) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        unbind_request_id(token)


def _log_access(response: Response) -> None:
    started = g.get("access_started")
    millis = round((time.perf_counter() - started) * 1000, 1) if started is not None else None
    path = quote(request.path, safe=_PATH_SAFE)[:MAX_LOGGED_PATH]
    fields = {
        "method": request.method[:16],
        "path": path,
        "status": response.status_code,
        "duration_ms": millis,
        "bytes": response.content_length,
        "cached": g.get("cached"),
    }
    access_log.info(
        "%s %s %s %sms %sB cached=%s",
        fields["method"],
        path,
        response.status_code,
        "-" if millis is None else millis,
        "-" if fields["bytes"] is None else fields["bytes"],
        "-" if fields["cached"] is None else str(fields["cached"]).lower(),
        extra=fields,
    )
