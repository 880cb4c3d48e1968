"""image_input: decoding real images, fetching from a real local server, reading real files.

Everything is real: images are encoded by Pillow here, URLs are served by a real HTTP(S) server on
127.0.0.1, files are real files, FIFOs and symlinks in a temporary directory. Forbidden addresses
are only ever checked, never contacted.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from image_input import (
    FILE_ERROR,
    URL_ERROR,
    ImageInputError,
    allowed_filename,
    decode_image,
    fetch_url,
    is_address_allowed,
    read_file,
    resolve_allowed,
    url_fetch,
)
from local_http import LocalHTTPServer

MP = 40_000_000
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_bytes(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (16, 16)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def expect_error(status: int, message: str) -> Callable[[Callable[[], object]], None]:
    def check(call: Callable[[], object]) -> None:
        with pytest.raises(ImageInputError) as info:
            call()
        assert (info.value.status, info.value.message) == (status, message)

    return check


# ------------------------------------------------------------------------------------------
# decode_image


@pytest.mark.parametrize(
    ("fmt", "tol"),
    [("JPEG", 6), ("PNG", 0), ("BMP", 0), ("WEBP", 6), ("TIFF", 0), ("GIF", 0)],
)
def test_decodes_each_format_to_rgb(fmt: str, tol: int) -> None:
    colour = (200, 40, 30) if fmt != "GIF" else RED
    data = encode(Image.new("RGB", (24, 12), colour), fmt)
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB"
    assert img.size == (24, 12)
    assert close_to(img.getpixel((5, 5)), colour, tol)


def test_format_is_decided_by_bytes_not_by_any_name() -> None:
    # The orchestrator labels everything image/jpeg "image.jpg"; PNG/WEBP bytes must still work.
    for fmt in ("PNG", "WEBP"):
        assert decode_image(encode(Image.new("RGB", (4, 4), BLUE), fmt), max_pixels=MP).size == (
            4,
            4,
        )


def test_animated_gif_uses_frame_zero() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    img = decode_image(data, max_pixels=MP)
    assert img.getpixel((8, 8)) == RED


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=MP)
    assert img.size == (20, 40)
    assert close_to(img.getpixel((10, 5)), RED)  # the left edge is now the top
    assert close_to(img.getpixel((10, 35)), BLUE)


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and close_to(img.getpixel((8, 8)), RED)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    data = encode(Image.new("I;16", (8, 8), 40000), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (156, 156, 156)  # 40000/257, not 255


def test_rgba_png_is_composited_onto_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    img = decode_image(encode(rgba, "PNG"), max_pixels=MP)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == WHITE  # fully transparent black -> white, not black
    assert img.getpixel((1, 0)) == RED
    assert close_to(img.getpixel((2, 0)), (127, 127, 127), 1)


def test_palette_png_with_transparency() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] + list(BLUE) + [0] * (254 * 3))
    pal.putpixel((1, 1), 1)
    data = encode(pal, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    img = decode_image(data, max_pixels=MP)
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((1, 1)) == BLUE


def test_gif_with_transparent_index() -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] + list(RED) + [0] * (254 * 3))
    pal.putpixel((2, 2), 1)
    img = decode_image(encode(pal, "GIF", transparency=0), max_pixels=MP)
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((2, 2)) == RED


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("L", 77, "PNG", (77, 77, 77)),
        ("LA", (77, 0), "PNG", WHITE),
        ("LA", (77, 255), "PNG", (77, 77, 77)),
        ("1", 1, "PNG", WHITE),
        ("1", 0, "BMP", (0, 0, 0)),
        ("I", 65535, "TIFF", WHITE),
        ("F", 0.5, "TIFF", (127, 127, 127)),
    ],
)
def test_greyscale_modes(
    mode: str, value: object, fmt: str, expected: tuple[int, int, int]
) -> None:
    data = encode(Image.new(mode, (4, 4), value), fmt)  # type: ignore[arg-type]
    img = decode_image(data, max_pixels=MP)
    assert img.mode == "RGB" and close_to(img.getpixel((1, 1)), expected, 1)


def test_truncated_jpeg_is_400() -> None:
    noisy = Image.effect_noise((64, 64), 80).convert("RGB")
    data = encode(noisy, "JPEG")
    expect_error(400, "Invalid image: truncated or corrupt image data")(
        lambda: decode_image(data[: len(data) // 2], max_pixels=MP)
    )


def test_zero_bytes_is_400() -> None:
    expect_error(400, "Invalid image: empty image data")(lambda: decode_image(b"", max_pixels=MP))


def test_text_is_not_an_image_whatever_the_prefix() -> None:
    text = b"this is not a jpeg, whatever the filename says\n" * 10
    expect_error(400, "Invalid image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP)
    )
    expect_error(400, "Failed to load image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP, error_prefix=FILE_ERROR)
    )
    expect_error(400, "Failed to download image: not a supported image format")(
        lambda: decode_image(text, max_pixels=MP, error_prefix=URL_ERROR)
    )


def png_header_only(width: int, height: int) -> bytes:
    """A tiny but well-formed PNG that declares a huge canvas (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding() -> None:
    data = png_header_only(8000, 6000)  # 48 MP: over our 40 MP, under Pillow's own fence
    assert len(data) < 200
    started = time.monotonic()
    expect_error(400, "Image too large: 8000\u00d76000 pixels exceeds the limit of 40000000")(
        lambda: decode_image(data, max_pixels=MP)
    )
    assert time.monotonic() - started < 0.5  # no 144 MB allocation, no inflating


def test_huge_declared_canvas_refused() -> None:
    with pytest.raises(ImageInputError) as info:
        decode_image(png_header_only(20000, 20000), max_pixels=MP)
    assert info.value.status == 400 and info.value.message.startswith("Image too large: ")


def test_pixel_limit_is_the_one_passed_in() -> None:
    data = png_bytes(size=(100, 50))
    expect_error(400, "Image too large: 100\u00d750 pixels exceeds the limit of 4999")(
        lambda: decode_image(data, max_pixels=4999)
    )
    assert decode_image(data, max_pixels=5000).size == (100, 50)


def test_allowed_filename() -> None:
    assert allowed_filename("image.jpg") and allowed_filename("a.b.JPEG")
    assert allowed_filename("x.webp") and allowed_filename(".png")
    assert not allowed_filename("image") and not allowed_filename("image.jpg.exe")
    assert not allowed_filename("photo.tiff")


# ------------------------------------------------------------------------------------------
# Address policy


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.0.1",
        "224.0.0.1",
        "239.255.255.250",
        "0.0.0.0",
        "0.1.2.3",
        "240.0.0.1",
        "255.255.255.255",
        "100.100.100.200",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "ff02::1",
        "::ffff:169.254.169.254",
        "::ffff:0.0.0.0",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "fd00:ec2::254",
        "not-an-ip",
    ],
)
def test_forbidden_addresses_always_refused(address: str) -> None:
    assert not is_address_allowed(address, allow_private=True)
    assert not is_address_allowed(address, allow_private=False)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.5.4", "192.168.1.10", "100.64.0.1", "::1"]
    + ["fd12:3456::1", "::ffff:127.0.0.1", "::ffff:192.168.0.1"],
)
def test_private_and_loopback_depend_on_the_setting(address: str) -> None:
    assert is_address_allowed(address, allow_private=True)
    assert not is_address_allowed(address, allow_private=False)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_allowed(address: str) -> None:
    assert is_address_allowed(address, allow_private=False)


def test_localhost_name_resolves_and_is_vetted() -> None:
    expect_error(400, "Failed to download image: address not allowed")(
        lambda: resolve_allowed("localhost", 80, allow_private=False, timeout=2)
    )
    found = resolve_allowed("localhost", 80, allow_private=True, timeout=2)
    assert found and all(is_address_allowed(a[3][0], allow_private=True) for a in found)


# ------------------------------------------------------------------------------------------
# url=


def fetch(url: str, *, timeout: float = 2.0, max_bytes: int = 1 << 20, private: bool = True):
    return fetch_url(url, max_bytes=max_bytes, timeout=timeout, allow_private=private)


def download_error(detail: str) -> Callable[[Callable[[], object]], None]:
    return expect_error(400, f"Failed to download image: {detail}")


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every address any socket in this process tries to connect to during the test."""
    seen: list[object] = []
    real = socket.socket.connect

    def spy(self: socket.socket, address: object) -> None:
        seen.append(address)
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    return seen


def test_url_success(http_server: LocalHTTPServer) -> None:
    data = png_bytes(BLUE)
    http_server.set("/cat.png", data, headers={"Content-Type": "image/png"})
    assert fetch(http_server.url("/cat.png")) == data
    assert decode_image(fetch(http_server.url("/cat.png")), max_pixels=MP).getpixel((0, 0)) == BLUE
    assert http_server.seen[0].headers.get("Accept-Encoding") == "identity"


def test_url_http_error_status(http_server: LocalHTTPServer) -> None:
    download_error("HTTP 404")(lambda: fetch(http_server.url("/missing.jpg")))
    http_server.set("/boom", b"oops", status=500)
    download_error("HTTP 500")(lambda: fetch(http_server.url("/boom")))


def test_url_slow_server_times_out(http_server: LocalHTTPServer) -> None:
    http_server.set("/slow", png_bytes(), delay=5)
    started = time.monotonic()
    download_error("timed out")(lambda: fetch(http_server.url("/slow"), timeout=1))
    assert time.monotonic() - started < 1.8


def trickle_body(req: BaseHTTPRequestHandler) -> None:
    req.send_response(200)
    req.send_header("Content-Length", "500000")  # under the cap: only the deadline can stop it
    req.end_headers()
    end = time.monotonic() + 6
    while time.monotonic() < end:  # one byte at a time: every single read is "fast"
        req.wfile.write(b"x")
        time.sleep(0.02)


def trickle_headers(req: BaseHTTPRequestHandler) -> None:
    req.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    end = time.monotonic() + 6
    while time.monotonic() < end:
        req.wfile.write(b"a")
        time.sleep(0.02)


@pytest.mark.parametrize("handler", [trickle_body, trickle_headers])
def test_url_deadline_holds_against_trickling(http_server: LocalHTTPServer, handler) -> None:
    http_server.handle("/trickle", handler)
    started = time.monotonic()
    download_error("timed out")(lambda: fetch(http_server.url("/trickle"), timeout=1))
    assert time.monotonic() - started < 1.5


def test_url_declared_huge_body_is_413_without_reading(http_server: LocalHTTPServer) -> None:
    sent: list[int] = []
    done = threading.Event()

    def huge(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Length", str(64 << 20))
        req.end_headers()
        total = 0
        try:
            for _ in range(1024):
                req.wfile.write(b"\0" * 65536)
                total += 65536
        finally:
            sent.append(total)
            done.set()

    http_server.handle("/huge", huge)
    expect_error(413, "Image too large: limit is 1048576 bytes")(
        lambda: fetch(http_server.url("/huge"), max_bytes=1 << 20)
    )
    assert done.wait(5) and sent[0] < 16 << 20


def test_url_streamed_body_over_cap_stops_early(http_server: LocalHTTPServer) -> None:
    sent: list[int] = []
    done = threading.Event()

    def endless(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Connection", "close")  # no Content-Length: read until close
        req.end_headers()
        total = 0
        try:
            for _ in range(2048):  # up to 128 MB if nobody stops reading
                req.wfile.write(b"\xff" * 65536)
                total += 65536
        finally:
            sent.append(total)
            done.set()

    http_server.handle("/endless", endless)
    started = time.monotonic()
    expect_error(413, "Image too large: limit is 1048576 bytes")(
        lambda: fetch(http_server.url("/endless"), max_bytes=1 << 20, timeout=5)
    )
    assert time.monotonic() - started < 2
    assert done.wait(5) and sent[0] < 32 << 20  # stopped long before 128 MB


def test_url_exactly_at_cap_is_fine(http_server: LocalHTTPServer) -> None:
    http_server.set("/exact", b"a" * 1000)
    assert len(fetch(http_server.url("/exact"), max_bytes=1000)) == 1000
    expect_error(413, "Image too large: limit is 999 bytes")(
        lambda: fetch(http_server.url("/exact"), max_bytes=999)
    )


def redirect_chain(server: LocalHTTPServer, hops: int) -> str:
    for i in range(hops):
        server.set(f"/r{i}", status=302, headers={"Location": f"/r{i + 1}"})
    server.set(f"/r{hops}", png_bytes())
    return server.url("/r0")


def test_url_five_redirects_are_followed(http_server: LocalHTTPServer) -> None:
    assert fetch(redirect_chain(http_server, 5)) == png_bytes()
    assert [s.path for s in http_server.seen] == [f"/r{i}" for i in range(6)]


def test_url_six_redirects_are_too_many(http_server: LocalHTTPServer) -> None:
    download_error("too many redirects")(lambda: fetch(redirect_chain(http_server, 6)))
    assert len(http_server.seen) == 6  # never asked for the 7th


def test_url_redirect_loop(http_server: LocalHTTPServer) -> None:
    http_server.set("/a", status=301, headers={"Location": "/b"})
    http_server.set("/b", status=307, headers={"Location": http_server.url("/a")})
    download_error("too many redirects")(lambda: fetch(http_server.url("/a")))


def test_url_non_image_body(http_server: LocalHTTPServer) -> None:
    http_server.set("/page", b"<html>hello</html>", headers={"Content-Type": "image/jpeg"})
    data = fetch(http_server.url("/page"))
    download_error("not a supported image format")(
        lambda: decode_image(data, max_pixels=MP, error_prefix=URL_ERROR)
    )


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "//169.254.169.254/latest/meta-data/",
    ],
)
def test_url_redirect_to_metadata_is_refused_before_connecting(
    http_server: LocalHTTPServer, connects: list[object], location: str
) -> None:
    http_server.set("/go", status=302, headers={"Location": location})
    download_error("address not allowed")(lambda: fetch(http_server.url("/go")))
    assert len(http_server.seen) == 1
    assert connects and all(addr[0] == "127.0.0.1" for addr in connects)  # type: ignore[index]


def test_url_redirect_to_other_scheme_is_refused(http_server: LocalHTTPServer) -> None:
    http_server.set("/ftp", status=302, headers={"Location": "ftp://127.0.0.1/x.jpg"})
    download_error("unsupported URL scheme")(lambda: fetch(http_server.url("/ftp")))
    http_server.set("/file", status=302, headers={"Location": "file:///etc/passwd"})
    download_error("unsupported URL scheme")(lambda: fetch(http_server.url("/file")))


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("ftp://127.0.0.1/image.jpg", "unsupported URL scheme"),
        ("file:///etc/passwd", "unsupported URL scheme"),
        ("gopher://127.0.0.1:70/", "unsupported URL scheme"),
        ("127.0.0.1/image.jpg", "invalid URL"),
        ("http://", "invalid URL"),
        ("http:///image.jpg", "invalid URL"),
        ("http://[::1/x", "invalid URL"),
        ("http://169.254.169.254/latest/meta-data/", "address not allowed"),
        ("http://[fe80::1]/", "address not allowed"),
        ("http://224.0.0.1/", "address not allowed"),
        ("http://[::]/", "address not allowed"),
    ],
)
def test_url_refused_without_connecting(connects: list[object], url: str, detail: str) -> None:
    download_error(detail)(lambda: fetch(url))
    assert connects == []


def test_url_unspecified_address_refused_even_though_linux_would_reach_us(
    http_server: LocalHTTPServer, connects: list[object]
) -> None:
    http_server.set("/img.png", png_bytes())
    download_error("address not allowed")(lambda: fetch(f"http://0.0.0.0:{http_server.port}/"))
    assert connects == [] and http_server.seen == []


def test_url_private_refused_when_disallowed(
    http_server: LocalHTTPServer, connects: list[object]
) -> None:
    http_server.set("/img.png", png_bytes())
    port = http_server.port
    for url in (
        http_server.url("/img.png"),
        f"http://localhost:{port}/img.png",
        f"http://2130706433:{port}/img.png",  # 127.0.0.1 spelled as one number
    ):
        download_error("address not allowed")(lambda u=url: fetch(u, private=False))
    assert connects == [] and http_server.seen == []
    # ...and allowed by default (animal-farm runs on a LAN).
    assert fetch(f"http://localhost:{port}/img.png") == png_bytes()


def test_url_connection_refused(connects: list[object]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    download_error("connection refused")(lambda: fetch(f"http://127.0.0.1:{port}/x.png"))


def test_url_credentials_only_go_to_their_own_origin(http_server: LocalHTTPServer) -> None:
    other = LocalHTTPServer()
    try:
        other.set("/img.png", png_bytes())
        http_server.set("/img.png", status=302, headers={"Location": other.url("/img.png")})
        url = f"http://user:secret@127.0.0.1:{http_server.port}/img.png"
        assert fetch(url) == png_bytes()
        sent = {k.lower(): v for k, v in http_server.seen[0].headers.items()}
        assert sent["authorization"] == "Basic dXNlcjpzZWNyZXQ="  # user:secret
        assert "authorization" not in {k.lower() for k in other.seen[0].headers}
    finally:
        other.close()


# --- HTTPS: certificates are verified against the URL's hostname -------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Self-signed certificates made with the openssl CLI: one for localhost, one for elsewhere."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    out: dict[str, tuple[Path, Path]] = {}
    base = tmp_path_factory.mktemp("certs")
    for name, san in (("localhost", "DNS:localhost,IP:127.0.0.1"), ("other", "DNS:other.test")):
        cert, key = base / f"{name}.pem", base / f"{name}.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext"]
            + [f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        out[name] = (cert, key)
    return out


class _TLSServer:
    """A real HTTPS server on 127.0.0.1 answering every GET with `respond`."""

    def __init__(self, cert: Path, key: Path, respond: Callable[[BaseHTTPRequestHandler], None]):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    respond(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_png(req: BaseHTTPRequestHandler) -> None:
    body = png_bytes(BLUE)
    req.send_response(200)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


@pytest.fixture
def tls_server(certs: dict[str, tuple[Path, Path]]) -> Iterator[Callable[..., _TLSServer]]:
    started: list[_TLSServer] = []

    def start(name: str, respond: Callable[[BaseHTTPRequestHandler], None] = serve_png):
        server = _TLSServer(*certs[name], respond)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def trust(monkeypatch: pytest.MonkeyPatch, cert: Path) -> None:
    """Trust a test certificate instead of the public CA bundle (the only thing swapped)."""
    ctx = url_fetch.build_ssl_context(str(cert))
    monkeypatch.setattr(url_fetch, "_ssl_context", lambda cafile=None: ctx)


def test_https_untrusted_certificate_refused(tls_server) -> None:
    server = tls_server("localhost")
    download_error("certificate verification failed")(
        lambda: fetch(f"https://localhost:{server.port}/img.png")
    )


def test_https_verified_against_hostname(tls_server, monkeypatch, certs) -> None:
    server = tls_server("localhost")
    trust(monkeypatch, certs["localhost"][0])
    assert fetch(f"https://localhost:{server.port}/img.png") == png_bytes(BLUE)

    wrong = tls_server("other")  # valid, trusted, but for another name
    trust(monkeypatch, certs["other"][0])
    download_error("certificate verification failed")(
        lambda: fetch(f"https://localhost:{wrong.port}/img.png")
    )


def test_https_deadline_holds_against_trickling(tls_server, monkeypatch, certs) -> None:
    server = tls_server("localhost", trickle_body)
    trust(monkeypatch, certs["localhost"][0])
    started = time.monotonic()
    download_error("timed out")(lambda: fetch(f"https://localhost:{server.port}/", timeout=1))
    assert time.monotonic() - started < 1.5


def test_https_stalled_handshake_times_out() -> None:
    with socket.socket() as listener:  # accepts TCP (kernel backlog) but never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        started = time.monotonic()
        download_error("timed out")(lambda: fetch(f"https://127.0.0.1:{port}/", timeout=1))
        assert time.monotonic() - started < 1.5


def test_https_to_plain_http_port_is_a_clean_error(http_server: LocalHTTPServer) -> None:
    download_error("TLS error")(lambda: fetch(f"https://127.0.0.1:{http_server.port}/x.png"))


# ------------------------------------------------------------------------------------------
# file=


def read(path: str | Path, *, max_bytes: int = 1 << 20, roots=None) -> bytes:
    return read_file(str(path), max_bytes=max_bytes, roots=roots)


def test_file_regular(tmp_path: Path) -> None:
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    assert read(tmp_path / "a.png") == data


def test_file_missing(tmp_path: Path) -> None:
    sent = str(tmp_path / "nope" / ".." / "missing.jpg")
    expect_error(400, f"File not found: {sent}")(lambda: read(sent))


def test_file_directory_refused(tmp_path: Path) -> None:
    expect_error(400, "Failed to load image: not a regular file")(lambda: read(tmp_path))


def test_file_device_refused() -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    expect_error(400, "Failed to load image: not a regular file")(lambda: read("/dev/zero"))


def test_file_fifo_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    worker = threading.Thread(target=lambda: result.append(_catch(lambda: read(fifo))))
    worker.start()
    worker.join(timeout=5)
    if worker.is_alive():  # unblock it before failing, so the test run itself cannot hang
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO hung")
    assert isinstance(result[0], ImageInputError)
    assert result[0].message == "Failed to load image: not a regular file"


def _catch(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - handed back to the test
        return exc
    return AssertionError("no error")


def test_file_over_cap_is_413(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(b"\0" * 2001)
    expect_error(413, "Image too large: limit is 2000 bytes")(
        lambda: read(tmp_path / "big.png", max_bytes=2000)
    )
    assert len(read(tmp_path / "big.png", max_bytes=2001)) == 2001


def test_file_empty_reads_and_then_fails_to_decode(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = read(tmp_path / "empty.jpg")
    expect_error(400, "Failed to load image: empty image data")(
        lambda: decode_image(data, max_pixels=MP, error_prefix=FILE_ERROR)
    )


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed root with an image inside, and a secret outside it."""
    root = tmp_path / "images"
    root.mkdir()
    (root / "cat.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes(BLUE))
    return root, tmp_path / "secret.png"


def test_file_roots_allow_inside(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    assert read(root / "cat.png", roots=(root,)) == png_bytes()
    assert read(f"{root}/sub/../cat.png", roots=(root,)) == png_bytes()
    expect_error(400, f"File not found: {root}/dog.png")(
        lambda: read(f"{root}/dog.png", roots=(root,))
    )


def test_file_roots_refuse_dotdot_escape(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    sent = f"{root}/../secret.png"
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))
    # Outside the roots, existence is not revealed either.
    sent = f"{root}/../does-not-exist.png"
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))


def test_file_roots_refuse_symlink_pointing_outside(rooted: tuple[Path, Path]) -> None:
    root, secret = rooted
    (root / "link.png").symlink_to(secret)
    sent = str(root / "link.png")
    expect_error(403, f"Access denied: {sent}")(lambda: read(sent, roots=(root,)))
    # Without roots the reference behaviour applies: any readable path.
    assert read(sent) == png_bytes(BLUE)


def test_file_roots_allow_symlink_inside(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    (root / "alias.png").symlink_to(root / "cat.png")
    assert read(root / "alias.png", roots=(root,)) == png_bytes()


def test_file_roots_through_symlinked_root(rooted: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = rooted
    via = tmp_path / "via"
    via.symlink_to(root, target_is_directory=True)
    assert read(via / "cat.png", roots=(root,)) == png_bytes()


def test_url_chunked_body(http_server: LocalHTTPServer) -> None:
    data = png_bytes((1, 2, 3), size=(64, 64))

    def chunked(req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        for i in range(0, len(data), 100):
            part = data[i : i + 100]
            req.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        req.wfile.write(b"0\r\n\r\n")

    http_server.handle("/chunked", chunked)
    assert fetch(http_server.url("/chunked")) == data


def test_url_gzip_body_is_decoded_within_the_cap(http_server: LocalHTTPServer) -> None:
    # We ask for identity, but a server may compress anyway; the cap applies to what we keep.
    data = png_bytes()
    http_server.set("/gz", zlib.compress(data, wbits=31), headers={"Content-Encoding": "gzip"})
    assert fetch(http_server.url("/gz")) == data
    bomb = zlib.compress(b"\0" * (64 << 20), level=9, wbits=31)  # ~64 KB on the wire
    http_server.set("/bomb", bomb, headers={"Content-Encoding": "gzip"})
    started = time.monotonic()
    expect_error(413, "Image too large: limit is 1048576 bytes")(
        lambda: fetch(http_server.url("/bomb"), max_bytes=1 << 20)
    )
    assert time.monotonic() - started < 1
