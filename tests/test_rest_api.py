"""The v3 HTTP contract (../shared/CONTRACT.md), end to end: real waitress, real HTTP client,
the real LAVIS model code with the tiny-shapes model. Here: captioning every way an image can
arrive, and every input error. The HTTP surface around it (routes, limits, CORS, JSON, health,
generation options, the CLI) is in test_rest_api_surface.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from rest_helpers import (
    assert_error,
    assert_success,
    encode,
    post_like_orchestrator,
    shapes_image,
    two_red_circles,
)
from rest_helpers import server as server  # a fixture, imported for pytest

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
