"""`/health`: the animal-farm `health.v1` document; 200 only when ready to caption."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from captioning.model_state import LOADED
from http_api.context import current_runtime
from http_api.envelope import SERVICE
from model_device import expected_device

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
