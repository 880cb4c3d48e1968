"""`/analyze` and `/v3/analyze`: one image in, the v3 envelope out (parse → pipeline → envelope)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, g, request

from captioning.errors import (
    AccessDenied,
    DeadlineExceeded,
    ImageInputError,
    InvalidRequest,
    NotReady,
    Overloaded,
    ServiceError,
    ShuttingDown,
    TooLarge,
)
from captioning.options import GenerationOptions, tags_requested
from http_api import door
from http_api.context import current_runtime
from http_api.envelope import started_at, success
from http_api.openapi import (
    STR,
    SUCCESS_EXAMPLE,
    ApiPart,
    error_responses,
    json_response,
    option_parameters,
)
from http_api.request_image import RAW_TYPES, image_source
from image_input.sources import ALLOWED_EXTENSIONS

if TYPE_CHECKING:
    from settings import Settings

bp = Blueprint("analyze", __name__)


@bp.before_request
def _admit() -> None:
    """While the model loads (or after it failed) every analyze call is 503 (CONTRACT.md); with
    every captioning slot taken, or no place left in the model's queue, 503 + Retry-After at
    once: before the body is parsed, the image read, downloaded or decoded. Most such requests
    were already refused on their headers, before the body was read (http_api/door.py); the
    queue place the door took for this one is adopted here, not taken twice."""
    runtime = current_runtime()
    g.reservation = door.adopt(request.environ)  # the place taken on the headers, if any
    runtime.model.ready()
    if not runtime.analyze_slots.acquire(blocking=False):
        raise Overloaded("Server busy: too many requests in progress, retry shortly")
    g.analyze_slot = runtime.analyze_slots
    options = GenerationOptions.from_public(request.args)
    g.options = options
    g.reservation = runtime.pipeline.admit(options, held=g.reservation)  # QueueFull: 503 now


@bp.teardown_request
def _release(_exc: BaseException | None) -> None:
    reservation = g.pop("reservation", None)
    if reservation is not None:
        reservation.release()  # a no-op once the request reached the queue
    slot = g.pop("analyze_slot", None)
    if slot is not None:
        slot.release()


@bp.route("/analyze", methods=["GET", "POST"])
@bp.route("/v3/analyze", methods=["GET", "POST"])
def analyze() -> Response:
    runtime = current_runtime()
    options: GenerationOptions = g.options
    tags = tags_requested(request.args)
    source = image_source(request, runtime.images)
    result = runtime.pipeline.caption(
        source,
        options,
        deadline=runtime.pipeline.deadline(started_at()),
        tags=tags,
        reservation=g.reservation,
    )
    g.cached = result.cached  # for the access log
    return success(result.predictions, cached=result.cached)


ANALYZE_ERRORS: tuple[type[ServiceError], ...] = (
    InvalidRequest,
    ImageInputError,
    AccessDenied,
    TooLarge,
    NotReady,
    Overloaded,
    DeadlineExceeded,
    ShuttingDown,
)


def openapi_part(settings: Settings) -> ApiPart:
    get_op = _analyze_operation(settings, "get")
    post_op = _analyze_operation(settings, "post")
    post_op["requestBody"] = _image_body(settings)
    paths = {}
    for path, alias in (("/analyze", False), ("/v3/analyze", True)):
        paths[path] = {
            method: {**op, "operationId": f"{method}_{'v3_' if alias else ''}analyze"}
            for method, op in (("get", get_op), ("post", post_op))
        }
    return ApiPart(
        paths=paths,
        tags=[{"name": "analyze", "description": "caption one image (the v3 envelope)"}],
    )


def _analyze_operation(settings: Settings, method: str) -> dict[str, Any]:
    limit = settings.max_file_size
    how = (
        "a raw image body, a multipart `file` part, or the `url`/`file` query (first match wins)"
        if method == "post"
        else "the `url` or `file` query parameter"
    )
    roots = (
        "only under the configured FILE_ROOTS (403 outside)"
        if settings.file_roots
        else "any path the server can read"
    )
    return {
        "tags": ["analyze"],
        "summary": "Caption one image" + (" (upload)" if method == "post" else ""),
        "description": (
            f"Captions the image given by {how}, maps the caption's words to emojis and "
            f"answers with the v3 envelope. Images over {limit} bytes get 413. Absent options "
            "mean the reference's decoding; a `max_length` below the default `min_length` "
            "lowers that default with it. An empty query value counts as absent. `/analyze` and "
            "`/v3/analyze` are identical. "
            f"`file` reads {roots}."
        ),
        "parameters": [
            {
                "name": "url",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": (
                    "http(s) URL of an image, e.g. `https://example.com/cat.jpg`, downloaded "
                    f"within TIMEOUT ({settings.timeout:g} s); any failure is 400 "
                    "`Failed to download image: …`. Not with `file`."
                ),
                "schema": STR,
            },
            {
                "name": "file",
                "in": "query",
                "required": False,
                "allowEmptyValue": True,
                "description": (
                    "path of an image on the server, e.g. `/data/images/cat.jpg`. Not with `url`."
                ),
                "schema": STR,
            },
            *option_parameters(),
        ],
        "responses": {
            "200": json_response(
                "The caption(s), one prediction each",
                "SuccessEnvelope",
                examples={"caption": SUCCESS_EXAMPLE},
            ),
            **error_responses(*ANALYZE_ERRORS),
        },
    }


def _image_body(settings: Settings) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}
    extensions = ", ".join(sorted(ALLOWED_EXTENSIONS))
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        **binary,
                        "description": (
                            f"the image; the filename's extension must be one of {extensions} "
                            "(400 `File type not allowed`), the bytes decide the real format"
                        ),
                    }
                },
            }
        }
    }
    for media_type in sorted(RAW_TYPES):
        content[media_type] = {"schema": {**binary, "contentMediaType": media_type}}
    return {
        "required": False,
        "description": (
            f"The image, at most {settings.max_file_size} bytes: a multipart part named `file`, "
            "or the raw bytes with one of these media types (the bytes decide the format: "
            "JPEG, PNG, GIF, BMP, WEBP, TIFF). An empty raw body is 400. Without either, the "
            "`url`/`file` query is read."
        ),
        "content": content,
    }
