"""Shared by the HTTP contract tests (test_rest_api*.py and the other tests that post images to
a served app): tiny-shapes images, the orchestrator's exact call, the contract's success and error
envelopes, and the `server` fixture (imported by name where a module uses it)."""

from __future__ import annotations

import io
import random
from typing import Any

import pytest
import requests
from PIL import Image

from tiny_shapes import Scene, draw

ORCHESTRATOR_TIMEOUT = 30


def shapes_image(
    count: int = 2,
    colour: str = "red",
    shape: str = "circle",
    background: str = "gray",
    seed: int = 7,
) -> Image.Image:
    return draw(Scene(count, colour, shape, background), random.Random(seed), size=128)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def two_red_circles(fmt: str = "PNG") -> bytes:
    return encode(shapes_image(), fmt)


def post_like_orchestrator(base: str, data: bytes, path: str = "/analyze") -> requests.Response:
    """The orchestrator's exact call: part `file`, filename image.jpg, type image/jpeg."""
    files = {"file": ("image.jpg", data, "image/jpeg")}
    return requests.post(base + path, files=files, timeout=ORCHESTRATOR_TIMEOUT)


def assert_error(
    resp: requests.Response, status: int, message: str | None = None, startswith: str | None = None
) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "metadata", "predictions", "service", "status"}
    assert body["status"] == "error"
    assert body["service"] == "blip2"
    assert body["predictions"] == []
    assert isinstance(body["metadata"]["processing_time"], float)
    if message is not None:
        assert body["error"]["message"] == message
    if startswith is not None:
        assert body["error"]["message"].startswith(startswith), body["error"]["message"]
    return body


def assert_success(resp: requests.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "success"
    assert body["service"] == "blip2"
    assert body["metadata"]["model_info"] == {
        "framework": "BLIP2 (Bootstrapping Language-Image Pre-training v2)"
    }
    assert isinstance(body["metadata"]["processing_time"], float)
    assert body["predictions"]
    for pred in body["predictions"]:
        assert pred["text"] and pred["text"] == pred["text"].capitalize()
        assert "emoji_mappings" not in pred or pred["emoji_mappings"]
    return body


@pytest.fixture
def server(serve_app, base_settings):
    return serve_app(base_settings)
