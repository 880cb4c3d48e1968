"""CORS as the reference answers it: `*` without an Origin, the Origin echoed (with Vary)."""

from __future__ import annotations

from flask import Flask, Response, request

EXPOSE_HEADERS = "X-Request-ID, Retry-After, Location"


def allowed_origins(origins: str) -> frozenset[str]:
    """CORS_ORIGINS (comma-separated) as a set."""
    return frozenset(o.strip() for o in origins.split(",") if o.strip())


def allow_origin(allowed: frozenset[str], origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for a request's Origin, or None for no header."""
    if origin is None:
        return "*" if "*" in allowed else None
    return origin if "*" in allowed or origin in allowed else None


def register(app: Flask, origins: str) -> None:
    allowed = allowed_origins(origins)

    @app.after_request
    def _cors(resp: Response) -> Response:
        resp.vary.add("Origin")
        allow = allow_origin(allowed, request.headers.get("Origin"))
        if allow is not None:
            resp.headers["Access-Control-Allow-Origin"] = allow
        resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        if request.method == "OPTIONS":
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Content-Type"
            )
            resp.headers["Access-Control-Max-Age"] = "600"
        return resp
