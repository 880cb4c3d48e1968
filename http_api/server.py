"""waitress, run so that stopping never drops accepted work.

    server = HttpServer(app, settings)
    server.serve(on_drain=runtime.begin_drain)   # returns once drained (or DRAIN_TIMEOUT passed)

On SIGTERM or SIGINT (:meth:`request_drain`, installed as the signal handler) the listening
socket is closed at once — new connections are refused, so a load balancer moves on — and
`on_drain` runs (the runtime then answers /health with 503 `draining`). The main thread keeps
running waitress's event loop until every connection is idle: no request being received, none
being served, no response bytes left to send. Then the loop stops and idle keep-alive
connections are closed. A second signal stops at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from waitress import create_server, wasyncore
from waitress.channel import HTTPChannel

from http_api import door
from http_api.envelope import SERVICE

if TYPE_CHECKING:
    from flask import Flask

    from settings import Settings

log = logging.getLogger("blip2.server")

LOOP_TIMEOUT = 0.1  # seconds between drain checks while draining


def waitress_options(settings: Settings) -> dict[str, Any]:
    """How waitress is sized and bounded for these settings (the tests' servers use it too)."""
    threads = settings.server_threads
    return {
        "threads": threads,
        "ident": SERVICE,
        # The door answers each route's own 413 on the headers (http_api/body_limits.py);
        # this is waitress's backstop, above the largest body any route takes.
        "max_request_body_size": max(
            settings.max_file_size * 2, settings.max_batch_bytes, settings.max_job_bytes
        )
        + (1 << 20),
        "channel_timeout": 120,
        # Every thread can hold a connection, plus room for health checks and idle clients.
        "connection_limit": max(100, threads * 4),
    }


class HttpServer:
    """One waitress server with a graceful drain; the main thread runs it."""

    def __init__(self, app: Flask, settings: Settings) -> None:
        self.drain_timeout = settings.drain_timeout
        self._server: Any = create_server(
            app, host=settings.bind_host, port=settings.port, **waitress_options(settings)
        )
        self.door = door.install(self._server, app, settings)  # 413/503 on the headers
        self._drain_requested_at: float | None = None
        self._stop_now = False

    @property
    def port(self) -> int:
        return int(self._server.effective_port)

    @property
    def host(self) -> str:
        return str(self._server.effective_host)

    def request_drain(self, *_signal: Any) -> None:
        """Stop accepting and start draining; a second call stops without waiting."""
        if self._drain_requested_at is not None:
            log.warning("second stop signal: stopping now")
            self._stop_now = True
            return
        self._drain_requested_at = time.monotonic()
        # dispatcher.close, not the server's close(): the trigger must keep working.
        wasyncore.dispatcher.close(self._server)
        log.info("stop signal: no new connections; draining for up to %gs", self.drain_timeout)

    def serve(self, on_drain: Callable[[], None] = lambda: None) -> bool:
        """Run the event loop until drained; returns True when nothing was cut off."""
        drain_started = False
        server = self._server
        while not self._stop_now:
            timeout = LOOP_TIMEOUT if drain_started else server.adj.asyncore_loop_timeout
            wasyncore.loop(timeout=timeout, map=server._map, use_poll=True, count=1)
            if self._drain_requested_at is None:
                continue
            if not drain_started:
                drain_started = True
                on_drain()
            if self._idle():
                break
            if time.monotonic() - self._drain_requested_at >= self.drain_timeout:
                log.warning("drain timeout: closing %d busy connections", self._busy_count())
                break
        idle = self._idle()
        self._close_all()
        return idle

    def time_left(self) -> float:
        """Seconds of the drain budget not yet used."""
        if self._drain_requested_at is None:
            return self.drain_timeout
        return max(0.0, self.drain_timeout - (time.monotonic() - self._drain_requested_at))

    # -- internals ------------------------------------------------------------------------

    def _channels(self) -> list[HTTPChannel]:
        return [c for c in list(self._server._map.values()) if isinstance(c, HTTPChannel)]

    @staticmethod
    def _busy(channel: HTTPChannel) -> bool:
        return bool(channel.requests or channel.request is not None or channel.total_outbufs_len)

    def _busy_count(self) -> int:
        return sum(1 for c in self._channels() if self._busy(c))

    def _idle(self) -> bool:
        return self._busy_count() == 0

    def _close_all(self) -> None:
        self._server.task_dispatcher.shutdown(timeout=1)
        wasyncore.close_all(self._server._map)
