"""Every error answered as an envelope, registered once: views raise, never translate.

Domain errors get their status and headers from `captioning.errors.HTTP_TABLE`; Werkzeug's own
HTTP errors (404, 405, 413) keep their codes with the envelope around them (a 413 says which
limit: the body's size, or a form's parts); anything unexpected
is logged with its stack and answered 500 with no internals.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from captioning.errors import NotReady, ServiceError, http_mapping, too_large
from http_api.envelope import error

log = logging.getLogger("blip2.http")


def register(app: Flask, max_file_size: int) -> None:
    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> Response:
        status, headers = http_mapping(exc)
        state = exc.state if isinstance(exc, NotReady) else "error"
        return error(status, exc.message, state=state, headers=headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        message = _too_large_message(max_file_size) if code == 413 else exc.name
        headers = {}
        allow = exc.get_response().headers.get("Allow") if code == 405 else None
        if allow:
            headers["Allow"] = allow
        return error(code, message, headers=headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error(500, "Internal server error")


def _too_large_message(max_file_size: int) -> str:
    """Werkzeug's 413: the body over its cap, or (within it) a form over its part limits."""
    length, cap = request.content_length, request.max_content_length
    if length is not None and (cap is None or length <= cap):
        return (
            f"Form too large: at most {request.max_form_parts} parts, and "
            f"{request.max_form_memory_size} bytes in a field that is not a file"
        )
    return too_large(max_file_size).message
