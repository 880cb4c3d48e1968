"""`POST /v3/batch`: several images in one request, one result per image, in input order.

Parse (several multipart `file` parts, a JSON body with `urls`/`files`, or one zip: uploaded,
raw, or `url=`) → bulk.inputs (limits, zip safety, per-item errors) → the pipeline, item by item
on the bulk service's pool (the batcher merges them) → the envelope with `results`. One bad
image never fails the others. The request parser here is shared with `/v3/jobs`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Request, Response, g, jsonify, request

from bulk.inputs import ZIP_ALONE, BulkLimits, BulkRequest, Upload, batch_items
from captioning.errors import (
    ImageInputError,
    InvalidOption,
    InvalidRequest,
    LimitExceeded,
    NotReady,
    Overloaded,
    TooLarge,
)
from captioning.options import OPTIONS, TAGS, GenerationOptions, OptionSpec, tags_requested
from http_api.body_limits import FORM_OVERHEAD, request_too_large
from http_api.context import current_runtime
from http_api.envelope import FRAMEWORK, SERVICE, elapsed, started_at, with_shine

if TYPE_CHECKING:
    from settings import Settings

bp = Blueprint("batch", __name__)

JSON_TYPES = frozenset({"application/json"})
ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed"})
_SPOOL_IN_MEMORY = 1 << 20


@dataclass
class ParsedBulk:
    """A bulk request's inputs, options, tags flag and (jobs) callback URL."""

    inputs: BulkRequest
    options: GenerationOptions
    tags: bool
    callback_url: str | None


def limit_body(req: Request, limits: BulkLimits, what: str) -> None:
    """Bound the body (and the form's parts) for a bulk route, with a clear 413."""
    cap = limits.max_bytes + FORM_OVERHEAD
    if req.content_length is not None and req.content_length > cap:
        raise request_too_large(limits.max_bytes, what)
    req.max_content_length = cap
    req.max_form_parts = limits.max_items + 64


def parse_bulk(req: Request, *, allow_callback: bool) -> ParsedBulk:
    """The inputs and options of a batch or job request (nothing is read from URLs here)."""
    media_type = (req.mimetype or "").lower()
    values: dict[str, Any] = dict(req.args.items())
    inputs = BulkRequest()
    if media_type in JSON_TYPES:
        body = _json_body(req)
        values.update(body)
        inputs.urls = _strings(body, "urls")
        inputs.files = _strings(body, "files")
    elif media_type == "multipart/form-data":
        uploads = [
            Upload(part.filename or "", part.stream, part.mimetype or "")
            for part in req.files.getlist("file")
        ]
        if any(upload.is_zip for upload in uploads):
            if len(uploads) > 1:
                raise InvalidRequest(ZIP_ALONE)
            inputs.archive = uploads[0]
        else:
            inputs.uploads = uploads
    elif media_type in ZIP_TYPES:
        inputs.archive = Upload("archive.zip", _seekable_body(req), media_type)
    elif req.content_length:
        raise InvalidRequest(
            "send multipart/form-data `file` parts, a JSON body or a zip archive (application/zip)"
        )
    url = (req.args.get("url") or "").strip()
    if url:
        inputs.archive_url = url
    callback = values.get("callback_url") if allow_callback else None
    if callback is not None and not isinstance(callback, str):
        raise InvalidRequest("callback_url must be a string")
    return ParsedBulk(
        inputs,
        GenerationOptions.from_public(values),
        tags_requested(values),
        callback.strip() or None if callback else None,
    )


def _json_body(req: Request) -> dict[str, Any]:
    try:
        body = req.get_json(silent=True)
    except RecursionError:  # nested deeper than the JSON decoder goes: not an options object
        body = None
    if not isinstance(body, dict):
        raise InvalidRequest("the JSON body must be an object")
    for spec in (*OPTIONS, TAGS):
        if spec.name in body and not _json_type_ok(spec, body[spec.name]):
            raise InvalidOption(spec.name, spec.message())
    return body


def _json_type_ok(spec: OptionSpec, value: Any) -> bool:
    """JSON options must have JSON types: 3, not "3"; true, not "true"."""
    if value is None:
        return True
    if spec.kind is bool:
        return isinstance(value, bool)
    if spec.kind is str:
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if spec.kind is int else isinstance(value, int | float)


def _strings(body: Mapping[str, Any], key: str) -> list[str]:
    raw = body.get(key)
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(v, str) and v.strip() for v in raw):
        raise InvalidRequest(f"`{key}` must be a list of non-empty strings")
    return [v.strip() for v in raw]


def _seekable_body(req: Request) -> Any:
    """A raw zip body in a temporary file (small ones in memory): zip reading must seek."""
    cap = req.max_content_length or 0
    spooled = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115
    copied = 0
    while chunk := req.stream.read(64 * 1024):
        copied += len(chunk)
        if cap and copied > cap:
            spooled.close()
            raise LimitExceeded(f"the archive is larger than {cap - FORM_OVERHEAD} bytes")
        spooled.write(chunk)
    spooled.seek(0)
    return spooled


# -- the route ---------------------------------------------------------------------------------


@bp.before_request
def _admit() -> None:
    """Like analyze: 503 while loading or with every captioning slot taken; then the bounds."""
    runtime = current_runtime()
    runtime.model.ready()
    if not runtime.analyze_slots.acquire(blocking=False):
        raise Overloaded("Server busy: too many requests in progress, retry shortly")
    g.analyze_slot = runtime.analyze_slots
    limit_body(request, runtime.bulk.batch_limits, "MAX_BATCH_BYTES")


@bp.teardown_request
def _release(_exc: BaseException | None) -> None:
    slot = g.pop("analyze_slot", None)
    if slot is not None:
        slot.release()


@bp.route("/v3/batch", methods=["POST"])
def batch() -> Response:
    runtime = current_runtime()
    bulk = runtime.bulk
    parsed = parse_bulk(request, allow_callback=False)
    items = batch_items(parsed.inputs, bulk.batch_limits, runtime.images, bulk.fetch_archive)
    results = bulk.caption_batch(
        items,
        parsed.options,
        tags=parsed.tags,
        deadline=runtime.pipeline.deadline(started_at()),
    )
    return batch_success(results)


def batch_success(results: list[dict[str, Any]]) -> Response:
    for entry in results:
        if "predictions" in entry:
            entry["predictions"] = with_shine(entry["predictions"])
    ok = sum(1 for entry in results if entry["status"] == "success")
    metadata: dict[str, Any] = {
        "model_info": {"framework": FRAMEWORK},
        "counts": {"total": len(results), "success": ok, "error": len(results) - ok},
    }
    body = {"metadata": metadata, "results": results, "service": SERVICE, "status": "success"}
    metadata["processing_time"] = elapsed()
    return jsonify(body)


# -- OpenAPI (collected by http_api/openapi.py) ------------------------------------------------

BATCH_ERRORS = (InvalidRequest, ImageInputError, LimitExceeded, TooLarge, NotReady, Overloaded)


def openapi_part(settings: Settings) -> Any:
    from http_api import openapi

    op = {
        "tags": ["bulk"],
        "operationId": "post_v3_batch",
        "summary": "Caption several images in one request",
        "description": (
            f"Up to {settings.max_batch_items} images (MAX_BATCH_ITEMS) and "
            f"{settings.max_batch_bytes} bytes (MAX_BATCH_BYTES): several multipart `file` "
            "parts; a JSON body with `urls` and/or `files` (in that order) and the generation "
            "options; or one zip archive (a single `file` part named `*.zip`, a raw "
            "`application/zip` body, or `url=`). One result per input, in input order; a bad "
            "image is that item's error and never fails the others. Unsafe archives (path "
            "traversal, absolute names, symbolic links, nested archives, compression or entry "
            "bombs) are refused whole. See docs/bulk.md."
        ),
        "parameters": [archive_url_parameter(settings), *openapi.option_parameters()],
        "requestBody": bulk_body(settings, jobs=False),
        "responses": {
            "200": openapi.json_response("One result per input, in order", "BatchResponse"),
            **openapi.error_responses(*BATCH_ERRORS),
        },
    }
    return openapi.ApiPart(
        paths={"/v3/batch": {"post": op}},
        schemas=bulk_schemas(),
        tags=[{"name": "bulk", "description": "several images per request; durable jobs"}],
    )


def archive_url_parameter(settings: Settings) -> dict[str, Any]:
    return {
        "name": "url",
        "in": "query",
        "required": False,
        "description": (
            "http(s) URL of a zip archive to caption (at most MAX_BATCH_BYTES, within TIMEOUT "
            f"{settings.timeout:g} s); the archive must then be the only input."
        ),
        "schema": {"type": "string"},
    }


def bulk_body(settings: Settings, *, jobs: bool) -> dict[str, Any]:
    from http_api import openapi

    binary = {"type": "string", "format": "binary"}
    options = {spec.name: openapi.option_parameter(spec)["schema"] for spec in (*OPTIONS, TAGS)}
    strings = {"type": "array", "items": {"type": "string", "minLength": 1}}
    json_props: dict[str, Any] = {
        "urls": {**strings, "description": "image URLs (fetched like `url=` on analyze)"},
        "files": {**strings, "description": "image paths on the server (FILE_ROOTS apply)"},
        **options,
    }
    if jobs:
        json_props["callback_url"] = {
            "type": "string",
            "description": "POSTed the job's status as JSON when it ends (same address rules "
            "as `url=`)",
        }
    return {
        "required": False,
        "description": "The images: multipart parts, a JSON body, or a zip archive.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": binary,
                            "description": "images (or one `*.zip`), each at most "
                            f"{settings.max_file_size} bytes",
                        }
                    },
                }
            },
            "application/json": {"schema": {"type": "object", "properties": json_props}},
            "application/zip": {"schema": binary},
        },
    }


def bulk_schemas() -> dict[str, Any]:
    from http_api import openapi

    item_status = ["success", "error", "pending", "running", "skipped"]
    return {
        "ItemResult": {
            "type": "object",
            "required": ["index", "source", "status"],
            "properties": {
                "index": {"type": "integer", "minimum": 0},
                "source": {"type": "string", "description": "file name, URL, path or "
                           "`archive.zip: entry`"},
                "status": {"enum": item_status},
                "predictions": {"type": "array", "items": openapi.ref("Prediction")},
                "error": {"type": "string"},
            },
            "additionalProperties": False,
        },
        "BatchResponse": {
            "type": "object",
            "required": ["metadata", "results", "service", "status"],
            "properties": {
                "metadata": {
                    "type": "object",
                    "required": ["model_info", "processing_time", "counts"],
                    "properties": {
                        "model_info": {"type": "object"},
                        "processing_time": {"type": "number", "minimum": 0},
                        "counts": {
                            "type": "object",
                            "properties": {
                                k: {"type": "integer", "minimum": 0}
                                for k in ("total", "success", "error")
                            },
                        },
                    },
                },
                "results": {"type": "array", "items": openapi.ref("ItemResult")},
                "service": {"const": SERVICE},
                "status": {"const": "success"},
            },
            "additionalProperties": False,
        },
    }  # fmt: skip
