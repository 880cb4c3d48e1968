"""`/health`: the animal-farm `health.v1` document; 200 only when ready to caption."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, jsonify

from captioner.device import expected_device
from captioning.model_state import LOADED
from http_api.context import current_runtime
from http_api.envelope import SERVICE
from http_api.openapi import HEALTH_EXAMPLE, ApiPart, json_response

if TYPE_CHECKING:
    from settings import Settings

bp = Blueprint("health", __name__)

DRAINING = "draining"


@bp.route("/health", methods=["GET"])
def health() -> Response:
    runtime = current_runtime()
    model = runtime.model.health()
    plan = runtime.device_plan
    device = model.get("device") or (
        plan.device if plan is not None else expected_device(runtime.settings.device)
    )
    model.setdefault("device", device)
    state = DRAINING if runtime.draining else runtime.model.state
    ready = state == LOADED
    body = {
        "dependencies": {
            "emoji_config": runtime.emoji.health(),
            "result_cache": runtime.cache.health(),
        },
        "device": device,
        "endpoints": [],
        "model": model,
        "model_status": runtime.model.state,
        "schema_version": "health.v1",
        "service": SERVICE,
        "status": "healthy" if ready else state,
        "warnings": runtime.warnings(),
    }
    resp = jsonify(body)
    resp.status_code = 200 if ready else 503
    return resp


def openapi_part(settings: Settings) -> ApiPart:
    loading = {
        **HEALTH_EXAMPLE,
        "model": {"device": "cpu", "status": "loading"},
        "model_status": "loading",
        "status": "loading",
    }
    op = {
        "tags": ["operations"],
        "operationId": "health",
        "summary": "Readiness (health.v1)",
        "description": (
            "200 only when the model is loaded and the service takes work; 503 while it loads "
            "(`loading`), after a failed load (`error`, the reason in `warnings`) and while "
            "draining for shutdown (`draining`)."
        ),
        "responses": {
            "200": json_response("Ready", "Health", examples={"healthy": HEALTH_EXAMPLE}),
            "503": json_response("Not ready", "Health", examples={"loading": loading}),
        },
    }
    return ApiPart(
        paths={"/health": {"get": op}},
        tags=[{"name": "operations", "description": "health, documentation"}],
    )
