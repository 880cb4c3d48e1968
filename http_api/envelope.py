"""The animal-farm v3 JSON envelopes: success, error, and the request clock they report.

Bodies are built here and nowhere else. Keys are sorted and non-ASCII is escaped by the app's
JSON provider (configured in http_api/__init__.py), as the reference does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

from flask import Response, g, jsonify

SERVICE = "blip2"
FRAMEWORK = "BLIP2 (Bootstrapping Language-Image Pre-training v2)"
SHINY_CHANCE = 1 / 2500


def start_clock() -> None:
    g.started = time.monotonic()


def started_at() -> float:
    return getattr(g, "started", None) or time.monotonic()


def elapsed() -> float:
    started = getattr(g, "started", None)
    return round(time.monotonic() - started, 3) if started is not None else 0.0


def with_shine(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reference's easter egg: one prediction in 2,500 carries `"shiny": true`."""
    out = []
    for entry in entries:
        entry = dict(entry)
        if random.random() < SHINY_CHANCE:
            entry["shiny"] = True
        out.append(entry)
    return out


def success(predictions: list[dict[str, Any]], *, cached: bool = False) -> Response:
    metadata: dict[str, Any] = {"model_info": {"framework": FRAMEWORK}}
    if cached:
        metadata["cached"] = True
    body = {
        "metadata": metadata,
        "predictions": with_shine(predictions),
        "service": SERVICE,
        "status": "success",
    }
    metadata["processing_time"] = elapsed()
    return jsonify(body)


def error(
    status: int, message: str, *, state: str = "error", headers: dict[str, str] | None = None
) -> Response:
    """The error envelope; `state` is the lifecycle word the contract puts in `status`."""
    resp = jsonify(error_body(message, state=state, processing_time=elapsed()))
    resp.status_code = status
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def error_body(
    message: str, *, state: str = "error", processing_time: float = 0.0
) -> dict[str, Any]:
    """The error envelope's body (also written by the door, http_api/door.py, outside Flask)."""
    return {
        "error": {"message": message},
        "metadata": {"processing_time": processing_time},
        "predictions": [],
        "service": SERVICE,
        "status": state,
    }
