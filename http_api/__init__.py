"""The HTTP edge: one blueprint module per part, wired onto an app by :func:`init_app`.

    analyze.py   /analyze, /v3/analyze           request_image.py  which image a request carries
    batch.py     /v3/batch (several images)       jobs.py           /v3/jobs (async, durable)
    health.py    /health                         envelope.py       the v3 bodies
    page.py      /  (browser page, page_static/)
    errors.py    every error → envelope           cors.py           CORS headers
    metrics.py   /metrics, request counting        request_log.py    X-Request-ID, access log
    context.py   the runtime behind the app        door.py           503 on the headers (waitress)

Views parse, call the pipeline, and wrap the result; they never translate errors or start
threads. To add a route: a new module with a `bp`, registered below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

from http_api import (
    analyze,
    batch,
    context,
    cors,
    docs,
    errors,
    health,
    jobs,
    metrics,
    page,
    request_log,
)
from http_api.envelope import start_clock

if TYPE_CHECKING:
    from captioning.runtime import Runtime


def init_app(app: Flask, runtime: Runtime) -> None:
    settings = runtime.settings
    context.attach(app, runtime)
    request_log.register(app)  # first: binds the request id before, logs after every hook
    metrics.register(app)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_file_size
    # "/v3//analyze" is a 404 in the envelope, not an HTML redirect built from the Host header.
    app.url_map.merge_slashes = False
    app.json.sort_keys = True  # type: ignore[attr-defined]
    app.json.ensure_ascii = True  # type: ignore[attr-defined]
    app.before_request(start_clock)
    cors.register(app, settings.cors_origins)
    errors.register(app, settings.max_file_size)
    for blueprint in (analyze.bp, batch.bp, docs.bp, health.bp, jobs.bp, metrics.bp, page.bp):
        app.register_blueprint(blueprint)
