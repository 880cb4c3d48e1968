"""Security headers for the routes that serve HTML and its assets (the page, Swagger UI)."""

from __future__ import annotations

from flask import Blueprint, Response


def harden(bp: Blueprint, content_security_policy: str) -> None:
    """Every response of `bp`: this CSP, no MIME sniffing, no referrer leaks."""

    @bp.after_request
    def _harden(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = content_security_policy
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp
