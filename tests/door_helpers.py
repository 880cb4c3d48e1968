"""Shared by the door tests (tests/test_door*.py): the service's own HttpServer on a background
thread, the `serve` fixture that starts it around the tiny model (imported by name where a module
uses it), and raw-socket helpers to send a request's head without its body and read the answer."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests


class Served:
    """HttpServer (the production serving code) on a background thread, and its runtime."""

    def __init__(self, settings, captioner) -> None:
        from captioning.runtime import Runtime
        from http_api.server import HttpServer
        from REST import create_app

        self.runtime = Runtime(settings, captioner=captioner)
        if captioner is not None:
            self.runtime.start(wait=True)
        self.server = HttpServer(create_app(self.runtime), settings)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve, daemon=True)
        self._thread.start()

    @property
    def batcher(self):
        return self.runtime.model.batcher

    def close(self) -> None:
        self.server.request_drain()
        self.server.request_drain()  # the second signal: stop now
        self._thread.join(timeout=10)
        self.runtime.stop()


@pytest.fixture
def serve(base_settings, tiny_captioner) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def start(captioner: object = tiny_captioner, **overrides: object) -> Served:
        settings = base_settings.with_overrides(
            port=0, private=True, cache_size=0, drain_timeout=1.0, **overrides
        )
        served = Served(settings, captioner)
        made.append(served)
        return served

    yield start
    for served in made:
        served.close()


def head(
    path: str = "/analyze",
    length: int = 10_000_000,
    content_type: str = "image/png",
    extra: str = "",
    method: str = "POST",
) -> bytes:
    """The request line and headers of an upload (its body is sent separately, or never)."""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode("ascii")


def connect(served: Served) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_head(raw_head: bytes) -> tuple[int, dict[str, str]]:
    """A response's status line and headers: (status, headers lower-cased)."""
    lines = raw_head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    return int(lines[0].split()[1]), headers


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: (status, headers lower-cased, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    raw_head, body = data.split(b"\r\n\r\n", 1)
    status, headers = parse_head(raw_head)
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True when the server ends the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def answered_within(sock: socket.socket, seconds: float) -> bool:
    return bool(select.select([sock], [], [], seconds)[0])


def post_png(served: Served, image: bytes) -> requests.Response:
    return requests.post(
        served.url + "/analyze", data=image, headers={"Content-Type": "image/png"}, timeout=30
    )


def wait_for(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if check():
            return True
        time.sleep(0.02)
    return check()
