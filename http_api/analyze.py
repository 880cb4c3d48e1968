"""`/analyze` and `/v3/analyze`: one image in, the v3 envelope out (parse → pipeline → envelope)."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from captioning.errors import Overloaded
from captioning.options import GenerationOptions, tags_requested
from http_api.context import current_runtime
from http_api.envelope import started_at, success
from http_api.request_image import image_source

bp = Blueprint("analyze", __name__)


@bp.before_request
def _admit() -> None:
    """While the model loads (or after it failed) every analyze call is 503 (CONTRACT.md); with
    every captioning slot taken, 503 + Retry-After at once instead of waiting for a thread."""
    runtime = current_runtime()
    runtime.model.ready()
    if not runtime.analyze_slots.acquire(blocking=False):
        raise Overloaded("Server busy: too many requests in progress, retry shortly")
    g.analyze_slot = runtime.analyze_slots


@bp.teardown_request
def _release(_exc: BaseException | None) -> None:
    slot = g.pop("analyze_slot", None)
    if slot is not None:
        slot.release()


@bp.route("/analyze", methods=["GET", "POST"])
@bp.route("/v3/analyze", methods=["GET", "POST"])
def analyze() -> Response:
    runtime = current_runtime()
    options = GenerationOptions.from_public(request.args)
    tags = tags_requested(request.args)
    source = image_source(request, runtime.images)
    result = runtime.pipeline.caption(
        source, options, deadline=runtime.pipeline.deadline(started_at()), tags=tags
    )
    g.cached = result.cached  # for the access log
    return success(result.predictions, cached=result.cached)
