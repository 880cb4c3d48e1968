"""CORS as the reference answers it: `*` without an Origin, the Origin echoed (with Vary)."""

from __future__ import annotations

from flask import Flask, Response, request


def register(app: Flask, origins: str) -> None:
    allowed = frozenset(o.strip() for o in origins.split(",") if o.strip())

    @app.after_request
    def _cors(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        resp.vary.add("Origin")
        if origin is None:
            if "*" in allowed:
                resp.headers["Access-Control-Allow-Origin"] = "*"
        elif "*" in allowed or origin in allowed:
            resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After, Location"
        if request.method == "OPTIONS":
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Content-Type"
            )
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp
