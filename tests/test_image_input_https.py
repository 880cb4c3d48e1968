"""image_input's url= fetch over HTTPS: certificates are verified against the URL's hostname,
and the deadline holds through a stalled handshake or a trickling body.

Real HTTPS servers on 127.0.0.1 with self-signed certificates made by the openssl CLI (the tests
skip without it); only the trusted CA is swapped, never the verification.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from image_input import url_fetch
from image_input_helpers import BLUE, download_error, fetch, png_bytes, trickle_body
from local_http import LocalHTTPServer

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
