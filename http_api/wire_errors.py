"""waitress's own error answers, in the v3 envelope.

Why: some requests never reach Flask. waitress answers them itself: a request line, header or
chunk it cannot parse (400), headers over its 256 KiB cap (431), a body over its overall cap
(413), a transfer coding it does not know (501). Its answers are text/plain, while docs/api.md
promises that every error, on every route, is JSON in the same envelope. The door's channel
(http_api/door.py) uses :class:`EnvelopeErrorTask` for them instead of waitress's `ErrorTask`.
The message keeps waitress's reason and its short detail (e.g. "Content-Length is invalid");
an unexpected error says no more than Flask's own 500.
"""

from __future__ import annotations

import json

from waitress.task import ErrorTask

from http_api.envelope import error_body


def error_message(code: int, reason: str, detail: str) -> str:
    if code >= 500 and code != 501:
        return "Internal server error"
    return f"{reason}: {detail}" if detail else reason


class EnvelopeErrorTask(ErrorTask):
    """waitress's `ErrorTask` with the envelope for a body (status and close unchanged)."""

    def execute(self) -> None:
        err = self.request.error
        message = error_message(err.code, err.reason, str(err.body or "").strip())
        body = json.dumps(error_body(message), sort_keys=True, separators=(",", ":"))
        data = body.encode("ascii") + b"\n"  # as Flask's jsonify ends a body
        self.status = f"{err.code} {err.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(data)
        self.write(data)
