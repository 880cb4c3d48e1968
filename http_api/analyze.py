"""`/analyze` and `/v3/analyze`: one image in, the v3 envelope out (parse → pipeline → envelope)."""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from captioning.options import GenerationOptions
from http_api.context import current_runtime
from http_api.envelope import started_at, success
from http_api.request_image import image_source

bp = Blueprint("analyze", __name__)


@bp.before_request
def _model_ready() -> None:
    """While the model loads (or after it failed) every analyze call is 503 (CONTRACT.md)."""
    current_runtime().model.ready()


@bp.route("/analyze", methods=["GET", "POST"])
@bp.route("/v3/analyze", methods=["GET", "POST"])
def analyze() -> Response:
    runtime = current_runtime()
    options = GenerationOptions.from_public(request.args)
    source = image_source(request, runtime.images)
    result = runtime.pipeline.caption(
        source, options, deadline=runtime.pipeline.deadline(started_at())
    )
    g.cached = result.cached  # for the access log
    return success(result.predictions, cached=result.cached)
