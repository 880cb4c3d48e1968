"""A real HTTP server on 127.0.0.1 that tests program route by route.

It stands in for GitHub (emoji config), image hosts (``url=``) and model download mirrors.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], None]


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-response (timeouts, size caps) are expected, not errors."""

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class LocalHTTPServer:
    """Threaded HTTP server; `set` a canned response or `handle` a path with a function."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.seen: list[Seen] = []
        owner = self

        class _RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _dispatch(self) -> None:
                path = self.path.split("?", 1)[0]
                owner.seen.append(Seen(self.command, self.path, dict(self.headers.items())))
                handler = owner.routes.get(path)
                if handler is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "9")
                    self.end_headers()
                    self.wfile.write(b"not found")
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    handler(self)

            do_GET = _dispatch  # noqa: N815
            do_HEAD = _dispatch  # noqa: N815
            do_POST = _dispatch  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = _QuietServer(("127.0.0.1", 0), _RequestHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def handle(self, path: str, handler: Handler) -> None:
        self.routes[path] = handler

    def set(
        self,
        path: str,
        body: bytes | str = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer `path` with a fixed status, headers and body (after `delay` seconds)."""
        data = body.encode() if isinstance(body, str) else body

        def respond(req: BaseHTTPRequestHandler) -> None:
            if delay:
                time.sleep(delay)
            req.send_response(status)
            for key, value in (headers or {}).items():
                req.send_header(key, value)
            req.send_header("Content-Length", str(len(data)))
            req.end_headers()
            if req.command != "HEAD":
                req.wfile.write(data)

        self.routes[path] = respond

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
