"""waitress's own error answers, in the v3 envelope.

Why: some requests never reach Flask. waitress answers them itself: a request line, header or
chunk it cannot parse (400), headers over its 256 KiB cap (431), a body over its overall cap
(413), a transfer coding it does not know (501). Its answers are text/plain, while docs/api.md
promises that every error, on every route, is JSON in the same envelope. The door's channel
(http_api/door.py) uses :class:`EnvelopeErrorTask` for them instead of waitress's `ErrorTask`.
The message keeps waitress's reason and its short detail (e.g. "Content-Length is invalid");
an unexpected error says no more than Flask's own 500. Like every other answer, these carry an
`X-Request-ID` and the CORS headers, and are counted in `/metrics` and the access log (through
the door, which answers on the same socket thread).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from waitress.task import ErrorTask
from waitress.utilities import RequestEntityTooLarge

from http_api.cors import EXPOSE_HEADERS, allow_origin
from http_api.envelope import error_body
from http_api.request_log import HEADER, accept_request_id


def edge_headers(allowed: frozenset[str], headers: Mapping[str, str]) -> dict[str, str]:
    """X-Request-ID and CORS for an answer written before Flask (door, waitress), from the
    request's headers as waitress's parser keeps them (`X_REQUEST_ID`, `ORIGIN`)."""
    out = {
        HEADER: accept_request_id(headers.get("X_REQUEST_ID")),
        "Vary": "Origin",
        "Access-Control-Expose-Headers": EXPOSE_HEADERS,
    }
    allow = allow_origin(allowed, headers.get("ORIGIN"))
    if allow is not None:
        out["Access-Control-Allow-Origin"] = allow
    return out


class InOrderTooLarge(RequestEntityTooLarge):
    """The door's 413 for a request with answers still owed ahead of it on its connection
    (pipelined): set as the parser's error, it is answered in turn, with the view's message."""


def error_message(code: int, reason: str, detail: str) -> str:
    if code >= 500 and code != 501:
        return "Internal server error"
    return f"{reason}: {detail}" if detail else reason


class EnvelopeErrorTask(ErrorTask):
    """waitress's `ErrorTask` with the envelope for a body (status and close unchanged)."""

    def execute(self) -> None:
        request = self.request
        err = request.error
        detail = str(err.body or "").strip()
        in_order = isinstance(err, InOrderTooLarge)
        message = detail if in_order else error_message(err.code, err.reason, detail)
        body = json.dumps(error_body(message), sort_keys=True, separators=(",", ":"))
        data = body.encode("ascii") + b"\n"  # as Flask's jsonify ends a body
        door = getattr(self.channel, "door", None)
        extra = edge_headers(door.allowed if door else frozenset(), request.headers or {})
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.response_headers.extend(extra.items())
        self.set_close_on_finish()
        self.content_length = len(data)
        self.write(data)
        if door is not None:
            door.observe(request, err.code, len(data), extra[HEADER])
