"""The v3 HTTP contract (../shared/CONTRACT.md) around /analyze, end to end: real waitress, real
HTTP client, the real LAVIS model code with the tiny-shapes model. Unknown routes and methods,
body and form limits, CORS, sorted ASCII JSON with emoji mappings, /health while loaded, loading
and failed, the generation options, and `python REST.py` itself."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from rest_helpers import (
    assert_error,
    assert_success,
    post_like_orchestrator,
    two_red_circles,
)
from rest_helpers import server as server  # a fixture, imported for pytest

# ----------------------------------------------------------------------------- HTTP surface


def test_unknown_route_and_wrong_method_are_json(server) -> None:
    assert_error(requests.get(server.url + "/nope", timeout=10), 404)
    resp = requests.delete(server.url + "/analyze", timeout=10)
    assert_error(resp, 405)
    assert "GET" in resp.headers.get("Allow", "")
    assert_error(requests.post(server.url + "/health", timeout=10), 405)
    for doubled in ("/v3//analyze", "/v3/jobs/x//results"):  # a 404, not an HTML redirect
        resp = requests.get(server.url + doubled, allow_redirects=False, timeout=10)
        assert_error(resp, 404)


def test_body_over_max_file_size_is_413(serve_app, base_settings) -> None:
    server = serve_app(base_settings.with_overrides(max_file_size=10_000))
    big = os.urandom(20_000)
    assert_error(post_like_orchestrator(server.url, big), 413, startswith="Image too large")
    resp = requests.post(
        server.url + "/analyze", data=big, headers={"Content-Type": "image/png"}, timeout=10
    )
    assert_error(resp, 413, startswith="Image too large")
    chunked = requests.post(  # no Content-Length: refused as it is read
        server.url + "/analyze",
        data=(big[i : i + 4096] for i in range(0, len(big), 4096)),
        headers={"Content-Type": "image/png"},
        timeout=10,
    )
    assert_error(chunked, 413, startswith="Image too large")


def test_a_form_over_its_part_limits_is_413_that_says_so(server) -> None:
    small = two_red_circles()
    fields = [(f"x{i}", (None, "v")) for i in range(1_000)]  # over the form's part limit
    resp = requests.post(
        server.url + "/analyze", files=[*fields, ("file", ("a.png", small))], timeout=10
    )
    assert_error(resp, 413, message="Form too large: at most 1000 parts, and 500000 bytes in a "
                 "field that is not a file")  # fmt: skip


def test_cors(server) -> None:
    resp = requests.get(
        server.url + "/health", headers={"Origin": "https://ui.example"}, timeout=10
    )
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert "Origin" in resp.headers["Vary"]
    resp = requests.get(server.url + "/health", timeout=10)
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = requests.options(
        server.url + "/analyze",
        headers={
            "Origin": "https://ui.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "Content-Type",
        },
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://ui.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "Content-Type"


def _sorted_everywhere(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert keys == sorted(keys), keys
    return dict(pairs)


def test_json_keys_sorted_and_non_ascii_escaped(serve_app, base_settings, http_server) -> None:
    from emoji_config import EmojiConfigStore

    http_server.set("/emoji.json", json.dumps({"circles": "⭕", "red": "", "gray": "🩶"}))
    http_server.set("/mwe.txt", "gray_background\n")
    settings = base_settings.with_overrides(
        auto_update=True,
        emoji_mappings_url=http_server.url("/emoji.json"),
        mwe_url=http_server.url("/mwe.txt"),
    )
    server = serve_app(settings, emoji_store=EmojiConfigStore(settings))
    resp = post_like_orchestrator(server.url, two_red_circles())
    raw = resp.text
    assert raw.isascii() and "\\u2b55" in raw
    body = json.loads(raw, object_pairs_hook=_sorted_everywhere)
    pred = body["predictions"][0]
    assert pred["text"].startswith("Two red circles on a gray background")
    # `red` maps to "" (no emoji); the phrase gray_background swallows `gray`.
    assert pred["emoji_mappings"] == [{"emoji": "⭕", "word": "circles"}]
    health = requests.get(server.url + "/health", timeout=10)
    json.loads(health.text, object_pairs_hook=_sorted_everywhere)


def test_emoji_mappings_key_omitted_when_nothing_maps(
    serve_app, base_settings, http_server
) -> None:
    from emoji_config import EmojiConfigStore

    http_server.set("/emoji.json", json.dumps({"dog": "🐶"}))
    http_server.set("/mwe.txt", "hot_dog\n")
    settings = base_settings.with_overrides(
        auto_update=True,
        emoji_mappings_url=http_server.url("/emoji.json"),
        mwe_url=http_server.url("/mwe.txt"),
    )
    server = serve_app(settings, emoji_store=EmojiConfigStore(settings))
    body = assert_success(post_like_orchestrator(server.url, two_red_circles()))
    assert "emoji_mappings" not in body["predictions"][0]


def test_health_contract(server) -> None:
    resp = requests.get(server.url + "/health", timeout=2)
    assert resp.status_code == 200
    body = resp.json()
    for key, value in {
        "device": "cpu",
        "endpoints": [],
        "model_status": "loaded",
        "schema_version": "health.v1",
        "service": "blip2",
        "status": "healthy",
        "warnings": [],
    }.items():
        assert body[key] == value, key
    assert body["model"]["device"] == "cpu" and body["model"]["status"] == "loaded"
    assert isinstance(body["dependencies"], dict)
    assert body["dependencies"]["emoji_config"]["source"] in {"remote", "cache", "bundled"}


def test_loading_and_failed_model_answer_503(base_settings) -> None:
    from captioning.runtime import Runtime
    from REST import create_app
    from servers import RunningServer

    runtime = Runtime(base_settings)  # not started: the model is still loading
    app = create_app(runtime)
    server = RunningServer(app)
    try:
        resp = requests.get(server.url + "/health", timeout=2)
        assert resp.status_code == 503
        assert resp.json()["status"] == "loading"
        assert resp.json()["model"]["status"] == "loading"
        resp = post_like_orchestrator(server.url, two_red_circles())
        assert resp.status_code == 503 and resp.json()["status"] == "loading"
        assert resp.json()["error"]["message"] == "Model is loading"
        runtime.model.set_failed("checkpoint missing")
        resp = requests.get(server.url + "/health", timeout=2)
        assert resp.status_code == 503
        assert resp.json()["status"] == "error"
        assert any("checkpoint missing" in w for w in resp.json()["warnings"])
        resp = requests.get(server.url + "/analyze", params={"file": "/x"}, timeout=2)
        assert resp.status_code == 503 and resp.json()["status"] == "error"
    finally:
        server.close()
        runtime.stop()


# ----------------------------------------------------------------------------- generation options


def test_generation_options_validation(server) -> None:
    cases = {
        "num_beams=0": "num_beams",
        "num_beams=11": "num_beams",
        "num_beams=x": "num_beams",
        "max_length=76": "max_length",
        "min_length=40": "min_length",
        "max_length=20&min_length=21": "min_length",
        "num_captions=6": "num_captions",
        "num_captions=3&num_beams=2": "num_captions",
        "sampling=maybe": "sampling",
        "sampling=true&top_p=0": "top_p",
        "top_p=1.5": "top_p",
        "repetition_penalty=0.5": "repetition_penalty",
    }
    for query, param in cases.items():
        resp = requests.get(f"{server.url}/analyze?file=/x&{query}", timeout=10)
        body = assert_error(resp, 400)
        assert param in body["error"]["message"], (query, body)


def test_generation_options_take_effect(server) -> None:
    data = two_red_circles()

    def run(**params: Any) -> dict[str, Any]:
        resp = requests.post(
            server.url + "/analyze",
            params=params,
            data=data,
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        return assert_success(resp)

    default = run()["predictions"][0]["text"]
    three = run(num_captions=3)["predictions"]
    assert len(three) == 3 and three[0]["text"] == default
    assert len({p["text"] for p in three}) == 3  # distinct beams
    short = run(max_length=6)["predictions"][0]["text"]  # [DEC] a picture of + 2 words
    assert len(short.split()) == 2 and default.lower().startswith(short.lower())
    sampled = run(sampling="true", top_p="0.9", num_captions=2)["predictions"]
    assert len(sampled) == 2
    prompted = run(prompt="three blue")["predictions"][0]["text"]
    assert prompted.startswith("Three blue ")


def test_cli_serves_the_contract(tmp_path: Path) -> None:
    """`AUTO_UPDATE=false MODEL_CONFIG=models/tiny-shapes/model.yaml python REST.py --port P`."""
    import socket
    import subprocess

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "AUTO_UPDATE": "false",
        "MODEL_CONFIG": "models/tiny-shapes/model.yaml",
        "PRIVATE": "true",
        "EMOJI_CACHE_DIR": str(tmp_path / "emoji"),
    }
    proc = subprocess.Popen(
        [sys.executable, "REST.py", "--port", str(port)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        saw_loading = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                resp = requests.get(base + "/health", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.1)
                continue
            if resp.status_code == 200:
                break
            assert resp.status_code == 503
            saw_loading = True
            time.sleep(0.2)
        else:
            pytest.fail("service did not become healthy")
        assert saw_loading, "the port should open before the model is loaded"
        body = assert_success(post_like_orchestrator(base, two_red_circles()))
        assert body["predictions"][0]["text"].startswith("Two red circles on a ")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
