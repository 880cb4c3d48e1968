"""The browser test page at `GET /`: caption images by hand without curl.

People who integrate or try the service want to drop an image in and see what comes back. The
page is plain HTML, CSS and JavaScript in `page_static/` (no build step, nothing fetched from
elsewhere at run time) and talks to the same `v3/analyze` route as every other caller, through
relative URLs so it also works behind a proxy under a path prefix. Every response carries
`Cache-Control: no-cache` (revalidated by ETag), so a new release is never hidden behind a stale
script, and a strict Content-Security-Policy: the page runs only its own script and styles.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from flask import Blueprint, Response, send_from_directory

from http_api.hardening import harden
from http_api.openapi import ApiPart, html_response

if TYPE_CHECKING:
    from settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "page_static"
STATIC_URL_PATH = "/page/static"

# img-src stays open: a pasted image URL is previewed from wherever it lives.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data: http: https:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'self'"
)

bp = Blueprint(
    "page",
    __name__,
    static_folder=str(STATIC_DIR),
    static_url_path=STATIC_URL_PATH,
)


@bp.route("/", methods=["GET"])
def index() -> Response:
    """The page itself; its script and styles are under STATIC_URL_PATH."""
    resp = send_from_directory(STATIC_DIR, "index.html", mimetype="text/html", max_age=None)
    resp.cache_control.no_cache = True
    return resp


harden(bp, CONTENT_SECURITY_POLICY)  # page and assets: same-origin script only


def openapi_part(settings: Settings) -> ApiPart:
    op = {
        "tags": ["operations"],
        "operationId": "page",
        "summary": "Browser test page",
        "description": "Upload, drop or paste an image and see its captions (HTML).",
        "responses": {"200": html_response("The page")},
    }
    return ApiPart(paths={"/": {"get": op}})
