"""`/openapi.json` and `/docs`: the API describes itself, and Swagger UI lets people try it.

The document is built by `http_api.openapi` from the parts that serve the routes and cached per
app. Swagger UI (5.x, which renders OpenAPI 3.1) is served from the `flask-swagger-ui` package's
bundled `dist/` under `/docs/static/`: nothing comes from a CDN, so it works offline. The page
refers to its assets and the document with relative URLs (it works behind a path prefix), turns
off Swagger's online validator badge (an outside request), and carries a Content-Security-Policy
that allows only its own scripts plus the one inline start-up script, pinned by its hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib.resources import files
from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app, jsonify

from http_api import openapi
from http_api.context import current_runtime
from http_api.hardening import harden
from http_api.openapi import ApiPart, html_response

if TYPE_CHECKING:
    from settings import Settings

SWAGGER_DIST = str(files("flask_swagger_ui") / "dist")
STATIC_URL_PATH = "/docs/static"

SWAGGER_CONFIG = {
    "url": "openapi.json",
    "dom_id": "#swagger-ui",
    "deepLinking": True,
    "validatorUrl": None,  # the default asks validator.swagger.io
    "displayRequestDuration": True,
}
START_SCRIPT = (
    "window.onload = function () {\n"
    f"  const config = {json.dumps(SWAGGER_CONFIG, sort_keys=True)};\n"
    "  config.presets = [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset];\n"
    '  config.layout = "StandaloneLayout";\n'
    "  window.ui = SwaggerUIBundle(config);\n"
    "};"
)
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>BLIP2 caption service - API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="stylesheet" href="docs/static/index.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script src="docs/static/swagger-ui-standalone-preset.js"></script>
  <script>{START_SCRIPT}</script>
</body>
</html>
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(START_SCRIPT.encode()).digest()).decode()
# Swagger UI sets inline styles; its images are data: URLs and its own files.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src 'self' 'sha256-{_SCRIPT_HASH}'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
)

bp = Blueprint("docs", __name__, static_folder=SWAGGER_DIST, static_url_path=STATIC_URL_PATH)


@bp.route("/openapi.json", methods=["GET"])
def openapi_json() -> Response:
    return jsonify(openapi.document(current_app, current_runtime().settings))


@bp.route("/docs", methods=["GET"])
def swagger_ui() -> Response:
    resp = Response(PAGE, mimetype="text/html")
    resp.cache_control.no_cache = True
    return resp


harden(bp, CONTENT_SECURITY_POLICY)


def openapi_part(settings: Settings) -> ApiPart:
    """This module's own routes, contributed the way every later route module does it."""
    document = {
        "tags": ["operations"],
        "operationId": "openapi",
        "summary": "This OpenAPI 3.1 document",
        "responses": {
            "200": {
                "description": "The document",
                "content": {
                    openapi.JSON: {
                        "schema": {"type": "object", "required": ["openapi", "info", "paths"]}
                    }
                },
            }
        },
    }
    ui = {
        "tags": ["operations"],
        "operationId": "docs",
        "summary": "Swagger UI for this document",
        "description": f"Assets under `{STATIC_URL_PATH}/` (from the flask-swagger-ui package).",
        "responses": {"200": html_response("Swagger UI")},
    }
    return ApiPart(paths={"/openapi.json": {"get": document}, "/docs": {"get": ui}})
