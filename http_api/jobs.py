"""`/v3/jobs`: durable asynchronous captioning jobs (create, status, results, cancel).

    POST   /v3/jobs                  same inputs as /v3/batch (+ callback_url) → 202, Location
    GET    /v3/jobs/<id>             state, counts, progress, timestamps, a page of results
    GET    /v3/jobs/<id>/results     every result as JSON Lines, streamed in item order
    DELETE /v3/jobs/<id>             cancel: nothing more starts; finished results stay readable

Views parse and shape; bulk.service does the work (spooling, the store, the worker).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, g, jsonify, request

from bulk.jobs import MAX_PAGE, JobView
from captioning.errors import (
    ImageInputError,
    InsufficientStorage,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    NotReady,
    Overloaded,
    TooLarge,
    TooManyJobs,
)
from http_api.batch import limit_body, parse_bulk
from http_api.context import current_runtime
from http_api.envelope import SERVICE, elapsed

if TYPE_CHECKING:
    from bulk.service import BulkService
    from settings import Settings

log = logging.getLogger(__name__)

bp = Blueprint("jobs", __name__)

JSON_LINES = "application/x-ndjson"
DEFAULT_PAGE = 100


def job_path(job_id: str) -> str:
    return f"/v3/jobs/{job_id}"


@bp.route("/v3/jobs", methods=["POST"])
def create_job() -> Response:
    runtime = current_runtime()
    bulk = runtime.bulk
    if not runtime.analyze_slots.acquire(blocking=False):
        raise Overloaded("Server busy: too many requests in progress, retry shortly")
    g.analyze_slot = runtime.analyze_slots
    limit_body(request, bulk.job_limits, "MAX_JOB_BYTES")
    parsed = parse_bulk(request, allow_callback=True)
    callback = bulk.check_callback(parsed.callback_url) if parsed.callback_url else None
    view = bulk.create_job(parsed.inputs, parsed.options, tags=parsed.tags, callback_url=callback)
    resp = _envelope({"job_id": view.job_id, "job": job_dict(bulk, view)})
    resp.status_code = 202
    resp.headers["Location"] = job_path(view.job_id)
    return resp


@bp.teardown_request
def _release(_exc: BaseException | None) -> None:
    slot = g.pop("analyze_slot", None)
    if slot is not None:
        slot.release()


@bp.route("/v3/jobs/<job_id>", methods=["GET"])
def job_status(job_id: str) -> Response:
    bulk = current_runtime().bulk
    offset = _int_arg("offset", 0, 0, None)
    limit = _int_arg("limit", DEFAULT_PAGE, 0, MAX_PAGE)
    view = bulk.job(job_id)
    # Past the last item the page is empty (and the store never sees an offset out of range).
    page = bulk.results(job_id, min(offset, view.counts.total), limit) if limit else []
    following = offset + len(page)
    return _envelope(
        {
            "job": job_dict(bulk, view),
            "results": [item.to_dict() for item in page],
            "page": {
                "offset": offset,
                "limit": limit,
                "next_offset": following if following < view.counts.total and limit else None,
            },
        }
    )


@bp.route("/v3/jobs/<job_id>/results", methods=["GET"])
def job_results(job_id: str) -> Response:
    lines = current_runtime().bulk.iter_results(job_id)  # 404 before the first byte
    return Response(_json_lines(lines), mimetype=JSON_LINES)


@bp.route("/v3/jobs/<job_id>", methods=["DELETE"])
def cancel_job(job_id: str) -> Response:
    bulk = current_runtime().bulk
    return _envelope({"job": job_dict(bulk, bulk.cancel(job_id))})


def job_dict(bulk: BulkService, view: JobView) -> dict[str, Any]:
    body = view.to_dict()
    body["callback"] = bulk.callback_state(view)
    body["links"] = {"self": job_path(view.job_id), "results": job_path(view.job_id) + "/results"}
    return body


def _envelope(fields: dict[str, Any]) -> Response:
    body = {"metadata": {"processing_time": elapsed()}, "service": SERVICE, "status": "success"}
    body.update(fields)
    return jsonify(body)


def _json_lines(items: Iterator[Any]) -> Iterator[str]:
    try:
        for item in items:
            yield json.dumps(item.to_dict(), sort_keys=True, ensure_ascii=True) + "\n"
    except Exception:  # the status line is sent: end the stream short, and say so in the log
        log.exception("job results stream ended early")


def _int_arg(name: str, default: int, low: int, high: int | None) -> int:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        value = -1
    if value < low or (high is not None and value > high):
        upper = f" to {high}" if high is not None else " or more"
        raise InvalidRequest(f"{name} must be an integer from {low}{upper}")
    return value


# -- OpenAPI (collected by http_api/openapi.py) ------------------------------------------------

CREATE_ERRORS = (
    InvalidRequest,
    ImageInputError,
    LimitExceeded,
    TooLarge,
    TooManyJobs,
    InsufficientStorage,
    NotReady,
    Overloaded,
)
READ_ERRORS = (NotFound, NotReady, Overloaded)


def openapi_part(settings: Settings) -> Any:
    from http_api import openapi
    from http_api.batch import archive_url_parameter, bulk_body

    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "description": "the id POST /v3/jobs returned",
        "schema": {"type": "string"},
    }
    create = {
        "tags": ["bulk"],
        "operationId": "create_job",
        "summary": "Start a durable captioning job",
        "description": (
            "The same inputs as /v3/batch, up to "
            f"{settings.max_job_items} images (MAX_JOB_ITEMS) and {settings.max_job_bytes} "
            "upload bytes (MAX_JOB_BYTES), plus an optional `callback_url`. Uploads are "
            "spooled to disk (JOBS_DISK_QUOTA: 507 when full); at most "
            f"{settings.max_jobs} jobs queued or running (MAX_JOBS: 429). Jobs survive "
            "restarts and run at a lower priority than interactive requests."
        ),
        "parameters": [archive_url_parameter(settings), *openapi.option_parameters()],
        "requestBody": bulk_body(settings, jobs=True),
        "responses": {
            "202": openapi.json_response(
                "Accepted: the job's id and status",
                "JobCreated",
                headers={
                    "Location": {
                        "description": "the job's status URL",
                        "schema": {"type": "string"},
                    }
                },
            ),
            **openapi.error_responses(*CREATE_ERRORS),
        },
    }
    status = {
        "tags": ["bulk"],
        "operationId": "get_job",
        "summary": "A job's state, counts, progress and a page of results",
        "parameters": [
            job_id,
            _page_param("offset", "first item of the page", 0, None, 0),
            _page_param("limit", "items in the page (0: none)", 0, MAX_PAGE, DEFAULT_PAGE),
        ],
        "responses": {
            "200": openapi.json_response("The job", "JobStatus"),
            **openapi.error_responses(InvalidRequest, *READ_ERRORS),
        },
    }
    cancel = {
        "tags": ["bulk"],
        "operationId": "cancel_job",
        "summary": "Cancel a job",
        "description": "Nothing more starts; items already being captioned may finish. "
        "Results stay readable until the job expires. Cancelling an ended job changes nothing.",
        "parameters": [job_id],
        "responses": {
            "200": openapi.json_response("The job after cancelling", "JobCancelled"),
            **openapi.error_responses(*READ_ERRORS),
        },
    }
    results = {
        "tags": ["bulk"],
        "operationId": "job_results",
        "summary": "Every result as JSON Lines, in item order",
        "description": "One `ItemResult` object per line, streamed.",
        "parameters": [job_id],
        "responses": {
            "200": {
                "description": "JSON Lines: one ItemResult per line",
                "content": {JSON_LINES: {"schema": {"type": "string"}}},
            },
            **openapi.error_responses(*READ_ERRORS),
        },
    }
    return openapi.ApiPart(
        paths={
            "/v3/jobs": {"post": create},
            "/v3/jobs/{job_id}": {"get": status, "delete": cancel},
            "/v3/jobs/{job_id}/results": {"get": results},
        },
        schemas=_job_schemas(),
    )


def _page_param(name: str, what: str, low: int, high: int | None, default: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "default": default}
    if high is not None:
        schema["maximum"] = high
    return {"name": name, "in": "query", "required": False, "description": what, "schema": schema}


def _job_schemas() -> dict[str, Any]:
    from http_api import openapi

    time = {"type": "string", "format": "date-time"}
    maybe_time = {"type": ["string", "null"], "format": "date-time"}
    counts = {
        "type": "object",
        "required": ["total", "pending", "running", "done", "error", "skipped"],
        "properties": {
            k: {"type": "integer", "minimum": 0}
            for k in ("total", "pending", "running", "done", "error", "skipped")
        },
    }
    envelope = {
        "metadata": {"type": "object", "required": ["processing_time"]},
        "service": {"const": SERVICE},
        "status": {"const": "success"},
    }
    return {
        "Job": {
            "type": "object",
            "required": ["job_id", "state", "created_at", "expires_at", "counts", "progress"],
            "properties": {
                "job_id": {"type": "string"},
                "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                "created_at": time,
                "started_at": maybe_time,
                "finished_at": maybe_time,
                "expires_at": time,
                "counts": counts,
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "error": {"type": ["string", "null"]},
                "options": {"type": "object"},
                "callback": {
                    "type": ["object", "null"],
                    "properties": {
                        "url": {"type": "string"},
                        "state": {"enum": ["pending", "delivered", "failed", None]},
                    },
                },
                "links": {
                    "type": "object",
                    "properties": {"self": {"type": "string"}, "results": {"type": "string"}},
                },
            },
        },
        "JobCreated": {
            "type": "object",
            "required": ["job_id", "job", "service", "status"],
            "properties": {"job_id": {"type": "string"}, "job": openapi.ref("Job"), **envelope},
            "additionalProperties": False,
        },
        "JobCancelled": {
            "type": "object",
            "required": ["job", "service", "status"],
            "properties": {"job": openapi.ref("Job"), **envelope},
            "additionalProperties": False,
        },
        "JobStatus": {
            "type": "object",
            "required": ["job", "results", "page", "service", "status"],
            "properties": {
                "job": openapi.ref("Job"),
                "results": {"type": "array", "items": openapi.ref("ItemResult")},
                "page": {
                    "type": "object",
                    "properties": {
                        "offset": {"type": "integer", "minimum": 0},
                        "limit": {"type": "integer", "minimum": 0},
                        "next_offset": {"type": ["integer", "null"]},
                    },
                },
                **envelope,
            },
            "additionalProperties": False,
        },
    }
