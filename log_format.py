"""Logging set-up for the service: plain text lines or one JSON object per line (`LOG_FORMAT`).

Operators grep plain lines; log shippers (Loki, Elasticsearch, Cloud Logging) want JSON with
fixed keys. Either way every record carries the id of the HTTP request it belongs to, so all
lines of one request can be found together: the HTTP edge binds the id in a context variable
for the request's thread (:func:`bind_request_id`), and a :class:`RequestIdFilter` on the
handler copies it onto each record. Records emitted outside a request (start-up, the inference
worker, which serves many requests in one batch) have no id: ``-`` in plain lines, ``null`` in
JSON. Fields passed with ``extra=`` (the access log's method, path, status, ...) become keys
of the JSON object.

    setup_logging("INFO", "json")       # REST.py, once, before anything logs
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("plain", "json")
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
NO_REQUEST_ID = "-"

# Per thread (and per asyncio task): waitress runs each request on one of its threads.
_request_id: ContextVar[str | None] = ContextVar("blip2_request_id", default=None)


def bind_request_id(request_id: str) -> Token[str | None]:
    """Mark the records logged from here on (in this thread) with `request_id`."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    """Undo :func:`bind_request_id` (at the end of the request, in the same thread)."""
    _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Puts the bound request id on each record as `record.request_id` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


def _standard_attributes() -> frozenset[str]:
    """Attributes every LogRecord has; anything else on a record came from ``extra=``."""
    blank = logging.LogRecord("", logging.INFO, "", 0, "", None, None)
    return frozenset(vars(blank)) | {"message", "asctime", "request_id", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, the
    record's ``extra=`` fields, and `exception` (the formatted traceback) when there is one."""

    def __init__(self) -> None:
        super().__init__()
        self._standard = _standard_attributes()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in self._standard and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing `log_format` lines with request ids."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(PLAIN_FORMAT, defaults={"request_id": NO_REQUEST_ID})
        )
    return handler


def setup_logging(level: str, log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records, and Python's warnings, to one handler on the root logger
    (replacing any handlers already there, like ``logging.basicConfig(force=True)``), so every
    line on stderr has the chosen format; returns that handler."""
    handler = make_handler(log_format, stream)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)  # library warnings as records, not raw stderr text
    return handler
