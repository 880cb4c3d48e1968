"""The v3 HTTP contract (../shared/CONTRACT.md), end to end: real waitress, real HTTP client,
the real LAVIS model code with the tiny-shapes model."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tiny_shapes import Scene, draw  # noqa: E402

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


# ----------------------------------------------------------------------------- success paths


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_orchestrator_multipart_any_real_format(server, fmt: str) -> None:
    kw = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    resp = post_like_orchestrator(server.url, encode(shapes_image(), fmt, **kw))
    body = assert_success(resp)
    assert body["predictions"][0]["text"].startswith("Two red circles on a")


@pytest.mark.parametrize(
    "content_type,fmt",
    [
        ("image/jpeg", "JPEG"),
        ("image/png", "PNG"),
        ("image/webp", "WEBP"),
        ("application/octet-stream", "PNG"),
        ("Image/PNG; charset=binary", "PNG"),
    ],
)
def test_raw_body_of_each_type(server, content_type: str, fmt: str) -> None:
    img = shapes_image(1, "blue", "square", "white")
    resp = requests.post(
        server.url + "/analyze",
        data=encode(img, fmt),
        headers={"Content-Type": content_type},
        timeout=30,
    )
    body = assert_success(resp)
    assert body["predictions"][0]["text"] == "One blue square on a white background"


def test_raw_body_empty(server) -> None:
    resp = requests.post(
        server.url + "/analyze", data=b"", headers={"Content-Type": "image/png"}, timeout=10
    )
    assert_error(resp, 400, "No image body provided")


def test_file_param_and_v3_alias_are_identical(server, tmp_path: Path) -> None:
    path = tmp_path / "shapes.png"
    path.write_bytes(two_red_circles())
    a = assert_success(
        requests.get(server.url + "/analyze", params={"file": str(path)}, timeout=30)
    )
    b = assert_success(
        requests.get(server.url + "/v3/analyze", params={"file": str(path)}, timeout=30)
    )
    assert a["predictions"][0]["text"] == b["predictions"][0]["text"]
    # No extension check on file=; the bytes decide.
    odd = tmp_path / "shapes.data"
    odd.write_bytes(two_red_circles())
    assert_success(requests.get(server.url + "/analyze", params={"file": str(odd)}, timeout=30))


def test_url_param_success_and_post_falls_back_to_query(server, http_server) -> None:
    http_server.set("/img.png", two_red_circles(), headers={"Content-Type": "image/png"})
    url = http_server.url("/img.png")
    body = assert_success(requests.get(server.url + "/analyze", params={"url": url}, timeout=30))
    assert body["predictions"][0]["text"].startswith("Two red circles")
    # A POST with neither a raw image type nor a `file` part reads the query string.
    resp = requests.post(
        server.url + "/v3/analyze", params={"url": url}, data={"other": "x"}, timeout=30
    )
    assert_success(resp)


def test_empty_param_counts_as_absent(server, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(two_red_circles())
    assert_success(
        requests.get(server.url + "/analyze", params={"url": "", "file": str(path)}, timeout=30)
    )


# ----------------------------------------------------------------------------- input errors


def test_no_input(server) -> None:
    message = "Must provide either url or file parameter, or POST a file"
    assert_error(requests.get(server.url + "/analyze", timeout=10), 400, message)
    assert_error(
        requests.post(server.url + "/analyze", data={"url": "http://x"}, timeout=10), 400, message
    )  # form fields are not read


def test_both_url_and_file(server) -> None:
    resp = requests.get(
        server.url + "/analyze", params={"url": "http://a/b.png", "file": "/x"}, timeout=10
    )
    assert_error(resp, 400, "Cannot provide both url and file parameters")


def test_multipart_filename_rules(server) -> None:
    data = two_red_circles()
    resp = requests.post(
        server.url + "/analyze", files={"file": ("", data, "image/png")}, timeout=10
    )
    assert_error(resp, 400, "No file selected")
    for name in ("notes.txt", "image", "image.png.exe"):
        resp = requests.post(
            server.url + "/analyze", files={"file": (name, data, "image/png")}, timeout=10
        )
        assert_error(resp, 400, "File type not allowed")
    resp = requests.post(server.url + "/analyze", files={"file": ("PHOTO.PNG", data)}, timeout=30)
    assert_success(resp)


def _half_jpeg() -> bytes:
    data = encode(Image.effect_noise((128, 128), 80).convert("RGB"), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello, I am text pretending to be a JPEG",
        two_red_circles("JPEG")[:600],
        # Pixel data cut in half: refused even though LAVIS (loaded here) flips Pillow's
        # process-wide LOAD_TRUNCATED_IMAGES switch on import.
        _half_jpeg(),
    ],
    ids=["zero-bytes", "text-named-jpg", "truncated-header", "truncated-pixels"],
)
def test_undecodable_upload_is_400(server, payload: bytes) -> None:
    resp = post_like_orchestrator(server.url, payload)
    assert_error(resp, 400, startswith="Invalid image")


def test_file_errors(server, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.png")
    assert_error(
        requests.get(server.url + "/analyze", params={"file": missing}, timeout=10),
        400,
        f"File not found: {missing}",
    )
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    resp = requests.get(server.url + "/analyze", params={"file": str(text)}, timeout=10)
    body = assert_error(resp, 400, startswith="Failed to load image: ")
    assert str(tmp_path) not in body["error"]["message"].replace(str(text), "")


def test_url_errors(serve_app, base_settings, http_server) -> None:
    server = serve_app(base_settings.with_overrides(timeout=1.0, max_file_size=200_000))
    http_server.set("/missing", b"nope", status=404)
    http_server.set("/text", b"just text", headers={"Content-Type": "text/plain"})
    http_server.set("/slow", two_red_circles(), delay=3.0)
    http_server.set("/loop", b"", status=302, headers={"Location": "/loop"})
    http_server.set(
        "/metadata",
        b"",
        status=302,
        headers={"Location": "http://169.254.169.254/latest/meta-data/"},
    )

    def endless(req) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/png")
        req.end_headers()
        chunk = b"\0" * 65536
        for _ in range(10_000):
            req.wfile.write(chunk)

    http_server.handle("/endless", endless)

    def get(path: str) -> requests.Response:
        return requests.get(
            server.url + "/analyze", params={"url": http_server.url(path)}, timeout=20
        )

    assert_error(get("/missing"), 400, startswith="Failed to download image: ")
    assert_error(get("/text"), 400, startswith="Failed to download image: ")
    started = time.monotonic()
    assert_error(get("/slow"), 400, startswith="Failed to download image: ")
    assert time.monotonic() - started < 3.0
    assert_error(get("/loop"), 400, startswith="Failed to download image: ")
    assert_error(get("/metadata"), 400, startswith="Failed to download image: ")
    assert_error(get("/endless"), 413, startswith="Image too large")
    resp = requests.get(server.url + "/analyze", params={"url": "file:///etc/passwd"}, timeout=10)
    assert_error(resp, 400, startswith="Failed to download image: ")


def test_file_roots(serve_app, base_settings, tmp_path: Path) -> None:
    root = tmp_path / "images"
    outside = tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    (root / "ok.png").write_bytes(two_red_circles())
    (outside / "secret.png").write_bytes(two_red_circles())
    os.symlink(outside / "secret.png", root / "link.png")
    server = serve_app(base_settings.with_overrides(file_roots=(root.resolve(),)))

    def get(path: str) -> requests.Response:
        return requests.get(server.url + "/analyze", params={"file": path}, timeout=30)

    assert_success(get(str(root / "ok.png")))
    escape = str(root / ".." / "private" / "secret.png")
    assert_error(get(escape), 403, f"Access denied: {escape}")
    assert_error(get(str(root / "link.png")), 403, f"Access denied: {root / 'link.png'}")


def test_image_formats_end_to_end(server) -> None:
    base = shapes_image(1, "green", "triangle", "black")
    rotated = base.rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": undoes the 90° CCW rotation above
    samples = {
        "exif-rotated": encode(rotated, "JPEG", quality=95, exif=exif),
        "cmyk": encode(base.convert("CMYK"), "JPEG", quality=95),
        "16-bit": encode(base.convert("I;16"), "PNG"),
        "gif-animated": encode(
            base, "GIF", save_all=True, append_images=[Image.new("RGB", base.size, "white")]
        ),
        "bmp": encode(base, "BMP"),
        "tiff": encode(base, "TIFF"),
    }
    for name, data in samples.items():
        resp = requests.post(
            server.url + "/analyze",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert resp.status_code == 200, (name, resp.text)
    text = assert_success(
        requests.post(
            server.url + "/analyze",
            data=samples["exif-rotated"],
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
    )["predictions"][0]["text"]
    assert text == "One green triangle on a black background"


def test_decompression_bomb_is_400(serve_app, base_settings) -> None:
    server = serve_app(base_settings.with_overrides(max_image_pixels=1_000_000))
    bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 MP of zeros: a few KB
    assert len(bomb) < 100_000
    resp = post_like_orchestrator(server.url, bomb)
    assert_error(resp, 400, startswith="Image too large")


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
