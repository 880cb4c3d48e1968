"""image_input's url= fetch and its address policy, against a real HTTP server on 127.0.0.1.

Status codes, deadlines against servers that trickle, size caps (declared, streamed, gzip),
redirects, credentials and refused schemes are each served for real; forbidden addresses
(metadata, link-local, multicast, unspecified, private when disallowed) are only ever checked,
never contacted, which the `connects` spy proves. HTTPS is in test_image_input_https.py.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler

import pytest

from image_input import URL_ERROR, decode_image, is_address_allowed, resolve_allowed
from image_input_helpers import (
    BLUE,
    MP,
    download_error,
    expect_error,
    fetch,
    png_bytes,
    trickle_body,
)
from local_http import LocalHTTPServer

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
