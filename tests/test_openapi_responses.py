"""What the service really answers matches its OpenAPI document (`GET /openapi.json`).

Real requests to a real waitress server (tiny-shapes model) are checked against the schema, media
type and headers the document gives for that route and status: success and every input error,
the limits (403, 413), a loading, failed and draining service (503), the pages, and the error
envelope of 404, 405 and an unexpected exception (500). The document itself is checked in
test_openapi.py.
"""

from __future__ import annotations

from typing import Any

import requests

from openapi_helpers import CIRCLES, JSON, assert_matches, fetch_document, schema_validator
from openapi_helpers import doc as doc  # a fixture, imported for pytest
from rest_helpers import post_like_orchestrator, two_red_circles
from rest_helpers import server as server  # a fixture, imported for pytest

# ----------------------------------------------------------------------------- real responses


def test_success_and_input_errors_match_the_document(server, doc, http_server, tmp_path) -> None:
    image = two_red_circles()
    (tmp_path / "circles.png").write_bytes(image)
    http_server.set("/circles.png", image, headers={"Content-Type": "image/png"})
    base = server.url
    for path in ("/analyze", "/v3/analyze"):
        resp = post_like_orchestrator(base, image, path)
        assert resp.json()["predictions"][0]["text"] == CIRCLES
        assert_matches(doc, path, "POST", resp)
        again = post_like_orchestrator(base, image, path)
        assert again.json()["metadata"].get("cached") is True
        assert_matches(doc, path, "POST", again)
    calls: list[tuple[str, str, dict[str, Any], int]] = [
        ("GET", "/analyze", {"params": {"file": str(tmp_path / "circles.png")}}, 200),
        ("GET", "/v3/analyze", {"params": {"url": http_server.url("/circles.png")}}, 200),
        ("POST", "/analyze", {"data": image, "headers": {"Content-Type": "image/png"}}, 200),
        (
            "POST",
            "/v3/analyze",
            {"data": image, "headers": {"Content-Type": "application/octet-stream"}},
            200,
        ),
        (
            "GET",
            "/analyze",
            {"params": {"file": str(tmp_path / "circles.png"), "num_captions": 3}},
            200,
        ),
        ("GET", "/analyze", {}, 400),  # no input
        ("GET", "/v3/analyze", {"params": {"url": "http://a/b.png", "file": "/x"}}, 400),
        ("GET", "/analyze", {"params": {"file": "/x", "num_beams": 99}}, 400),
        ("GET", "/analyze", {"params": {"file": str(tmp_path / "nope.png")}}, 400),
        ("GET", "/analyze", {"params": {"url": http_server.url("/missing.png")}}, 400),
        ("POST", "/analyze", {"data": b"text", "headers": {"Content-Type": "image/jpeg"}}, 400),
        ("POST", "/analyze", {"data": b"", "headers": {"Content-Type": "image/png"}}, 400),
        ("POST", "/v3/analyze", {"files": {"file": ("notes.txt", image, "text/plain")}}, 400),
        ("POST", "/v3/analyze", {"files": {"file": ("image.jpg", b"nope", "image/jpeg")}}, 400),
    ]
    for method, path, kw, status in calls:
        resp = requests.request(method, base + path, timeout=30, **kw)
        assert resp.status_code == status, (method, path, kw.get("params"), resp.text)
        assert_matches(doc, path, method, resp)


def test_limit_errors_match_the_document(serve_app, base_settings, tmp_path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(two_red_circles())
    (tmp_path / "outside.png").write_bytes(two_red_circles())
    settings = base_settings.with_overrides(max_file_size=5_000, file_roots=(root.resolve(),))
    server = serve_app(settings)
    doc = fetch_document(server.url)
    assert "FILE_ROOTS" in doc["paths"]["/analyze"]["get"]["description"]
    assert "5000 bytes" in doc["paths"]["/analyze"]["post"]["requestBody"]["description"]
    denied = requests.get(
        server.url + "/analyze", params={"file": str(tmp_path / "outside.png")}, timeout=10
    )
    assert denied.status_code == 403
    assert_matches(doc, "/analyze", "GET", denied)
    big = b"\0" * 20_000
    for resp in (
        post_like_orchestrator(server.url, big, "/v3/analyze"),
        requests.post(
            server.url + "/v3/analyze", data=big, headers={"Content-Type": "image/png"}, timeout=10
        ),
    ):
        assert resp.status_code == 413
        assert_matches(doc, "/v3/analyze", "POST", resp)


def test_unready_service_matches_the_document(base_settings) -> None:
    """Loading, failed and draining: /health and /analyze answer 503 as documented."""
    from captioning.runtime import Runtime
    from REST import create_app
    from servers import RunningServer

    runtime = Runtime(base_settings)  # not started: the model is loading
    server = RunningServer(create_app(runtime))
    try:
        doc = fetch_document(server.url)
        states = []
        for change in (lambda: None, lambda: runtime.model.set_failed("checkpoint missing")):
            change()
            health = requests.get(server.url + "/health", timeout=2)
            assert health.status_code == 503
            assert_matches(doc, "/health", "GET", health)
            resp = post_like_orchestrator(server.url, two_red_circles())
            assert resp.status_code == 503 and "Retry-After" in resp.headers
            assert_matches(doc, "/analyze", "POST", resp)
            states.append((health.json()["status"], resp.json()["status"]))
        assert states == [("loading", "loading"), ("error", "error")]
    finally:
        server.close()
        runtime.stop()


def test_health_and_pages_match_the_document(server, doc) -> None:
    health = requests.get(server.url + "/health", timeout=2)
    assert health.status_code == 200
    assert_matches(doc, "/health", "GET", health)
    for path in ("/", "/docs", "/openapi.json"):
        resp = requests.get(server.url + path, timeout=10)
        assert resp.status_code == 200
        assert_matches(doc, path, "GET", resp)
    server.runtime.begin_drain()
    draining = requests.get(server.url + "/health", timeout=2)
    assert draining.status_code == 503 and draining.json()["status"] == "draining"
    assert_matches(doc, "/health", "GET", draining)


def test_unknown_route_wrong_method_and_crash_answer_the_error_envelope(base_settings) -> None:
    """404/405 (any route) and an unexpected exception (500) carry the documented envelope."""
    from captioning.runtime import Runtime
    from REST import create_app
    from servers import RunningServer

    runtime = Runtime(base_settings)
    app = create_app(runtime)

    def crash() -> None:
        raise RuntimeError("a bug of ours, with /secret/internals")

    app.add_url_rule("/crash", "crash", crash)  # only in this app: a view that fails
    server = RunningServer(app)
    try:
        doc = fetch_document(server.url)
        envelope = schema_validator(doc, {"$ref": "#/components/schemas/ErrorEnvelope"})
        for method, path, status in (
            ("GET", "/nope", 404),
            ("DELETE", "/analyze", 405),
            ("POST", "/health", 405),
            ("GET", "/crash", 500),
        ):
            resp = requests.request(method, server.url + path, timeout=10)
            assert resp.status_code == status
            envelope.validate(resp.json())
            assert "internals" not in resp.text
        crash_schema = doc["paths"]["/analyze"]["get"]["responses"]["500"]["content"][JSON]
        schema_validator(doc, crash_schema["schema"]).validate(resp.json())
    finally:
        server.close()
        runtime.stop()
