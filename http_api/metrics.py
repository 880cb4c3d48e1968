"""`GET /metrics` (Prometheus text exposition format) and the hooks that count HTTP requests.

The metrics themselves are defined in `captioning.metrics` (one registry per runtime); this
module only records each request into them and serves the registry. Requests are labelled by
route template (``/v3/analyze``, ``/health``; ``unmatched`` for 404s), never by URL, so the
number of series stays bounded whatever clients send. A scrape reads counters and attributes
only: it never waits on the model or the queue.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from werkzeug.routing.exceptions import RoutingException

from captioning.metrics import UNMATCHED_ROUTE
from http_api.context import current_runtime

if TYPE_CHECKING:
    from http_api.openapi import ApiPart
    from settings import Settings

bp = Blueprint("metrics", __name__)


@bp.route("/metrics", methods=["GET"])
def metrics() -> Response:
    body = current_runtime().metrics.exposition()
    return Response(
        body, headers={"Content-Type": CONTENT_TYPE_LATEST, "Cache-Control": "no-store"}
    )


def openapi_part(settings: Settings) -> ApiPart:
    """`/metrics` in the OpenAPI document (collected by http_api/openapi.py)."""
    from http_api.openapi import ApiPart

    op = {
        "tags": ["operations"],
        "operationId": "metrics",
        "summary": "Prometheus metrics",
        "description": (
            "Every metric of this process in the Prometheus text exposition format; "
            "docs/operations.md lists them with their meaning. Never waits for the model."
        ),
        "responses": {
            "200": {
                "description": "The metrics",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    }
    return ApiPart(paths={"/metrics": {"get": op}})


def route_label(url_map: Map, method: str | None, path: str | None) -> str:
    """The route template a request line names, as Flask would label it; `unmatched` for
    anything else (for requests answered before Flask: the door's, waitress's own)."""
    if not path or not method:
        return UNMATCHED_ROUTE
    try:
        rule, _ = url_map.bind("localhost").match(path, method, return_rule=True)
    except (HTTPException, RoutingException, ValueError):
        return UNMATCHED_ROUTE
    return str(rule.rule)


def register(app: Flask) -> None:
    """Count every request the app answers (errors and 404s included)."""
    app.before_request(_begin)
    app.after_request(_count)
    app.teardown_request(_end)


def _begin() -> None:
    current_runtime().metrics.in_flight.inc()
    g.metrics_in_flight = True
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    started = g.get("metrics_started")
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
        current_runtime().metrics.observe_request(
            route, request.method, response.status_code, time.perf_counter() - started
        )
    return response


def _end(_exc: BaseException | None) -> None:
    if g.pop("metrics_in_flight", False):
        current_runtime().metrics.in_flight.dec()
