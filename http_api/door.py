"""The door: a request whose body is over its route's limit, and an analyze request that
cannot be queued, are refused on the request line and headers, before waitress reads the body.

Why: waitress reads a whole request body on its one socket thread (into a temporary file above
512 KiB) before any WSGI code runs, so a view, even a `before_request` that refuses at once,
answers a 64-client burst of 700 KiB uploads only after every body is in: 503 p95 was 1.0 s
(docs/performance.md). Here the check runs inside waitress's parser the moment the headers are
complete, on the socket thread, and the 503 is written from there: no worker thread, no Flask.

How: :func:`install` gives the server a channel class (waitress's `channel_class` hook) whose
parser calls :meth:`Door.check` when the headers of a request are complete. For `GET`/`POST`
`/analyze` and `/v3/analyze` the door asks what the view would ask (`ModelState.ready`, then
`Batcher.reserve` with the options' group) and either

- **refuses**: the v3 error envelope with the status and headers of `captioning.errors`'
  `HTTP_TABLE` (503 + Retry-After; `loading` while the model loads), `Connection: close`. The
  request never reaches Flask; the body is not parsed. After the answer is sent the socket is
  half-closed and what the client still sends is discarded for at most `LINGER_S` seconds
  (a client that writes its whole body before reading, like `requests`, would otherwise get a
  reset instead of the answer), then closed; or
- **admits**: the queue place it took rides with the request (a :class:`Ticket` in the WSGI
  environ) and the view adopts it (`Pipeline.admit(options, held=...)`) instead of reserving
  again: one request, one place, never counted twice.

Guarantee. A request the door lets in holds its place from its headers on, so the view never
refuses it for the queue bound, with one exception: when its body is more than `DOOR_HOLD`
seconds late *and* the queue is full when a newer request knocks, the door takes the stale
place back and gives it to the newcomer (a client trickling its body must not hold the queue
hostage); the late request then asks the queue again in the view, like any request that did not
pass the door (pipelined requests, `SHED_AT_DOOR=false`). A place is given back when the request
ends without reaching the view (client gone, parse error: the parser's close or the channel's),
and when the view is done (its teardown). The door only ever reserves through `Batcher.reserve`,
so queued jobs plus places never exceed MAX_QUEUE. Races are the queue's own: whoever reserves
first under the batcher's lock gets the place. The analyze-slot bound (THREADS - 4 requests in the
views) is not decided here: a thread is only taken once the body is in.

Body limits (http_api/body_limits.py) are checked first, on every route and whether or not the
door sheds (`SHED_AT_DOOR`): a Content-Length over the route's limit gets the view's own 413 at
once, and a chunked body is refused the moment it grows past it (its queue place, if it took
one, given back); a request behind others on its connection (pipelined) gets its 413 in
turn, as waitress's own errors are answered. Beyond that, /health and every other route are
untouched (not even looked at beyond the path and the size). waitress's own answers
(unparsable requests) come in the envelope too (http_api/wire_errors.py).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import http
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.task import WSGITask
from werkzeug.datastructures import MultiDict

from captioning.errors import NotReady, Overloaded, ServiceError, http_mapping
from captioning.options import GenerationOptions
from http_api.body_limits import BodyLimits
from http_api.context import runtime_of
from http_api.cors import allowed_origins
from http_api.envelope import SERVICE, error_body
from http_api.metrics import route_label
from http_api.request_log import ACCESS_LOGGER, HEADER
from http_api.wire_errors import EnvelopeErrorTask, InOrderTooLarge, edge_headers
from log_format import bind_request_id, unbind_request_id

if TYPE_CHECKING:
    from flask import Flask

    from captioning.admission import Reservation
    from captioning.runtime import Runtime
    from settings import Settings

log = logging.getLogger("blip2.door")
access_log = logging.getLogger(ACCESS_LOGGER)

ANALYZE_PATHS = frozenset({"/analyze", "/v3/analyze"})
METHODS = frozenset({"GET", "POST"})
ENVIRON_KEY = "blip2.door_ticket"
LINGER_S = 2.0  # after a refusal: discard what the client still sends, at most this long
LINGER_READ = 256 * 1024


class Ticket:
    """A queue place taken at the door for one request. Exactly one of three ends: the view
    adopts it, the door lends it to a newer request (stale), or it is dropped (released)."""

    __slots__ = ("door", "reservation", "taken_at", "owner")

    def __init__(self, door: Door, reservation: Reservation) -> None:
        self.door = door
        self.reservation = reservation
        self.taken_at = time.monotonic()
        self.owner = "door"  # → "view" (adopted) or "gone" (released)

    def adopt(self) -> Reservation | None:
        """The view takes the place over; None when the door already gave it away."""
        return self.door._settle(self, "view")

    def drop(self) -> None:
        """The request ends without a view: give the place back (no-op once adopted)."""
        reservation = self.door._settle(self, "gone")
        if reservation is not None:
            reservation.release()


def adopt(environ: Mapping[str, Any]) -> Reservation | None:
    """For the view: the queue place the door took for this request, if it still holds one."""
    ticket = environ.get(ENVIRON_KEY)
    return ticket.adopt() if isinstance(ticket, Ticket) else None


class Door:
    """The admission decision on headers, shared by every connection of one server."""

    def __init__(
        self, runtime: Runtime, settings: Settings, route_of: Callable[[str, str], str]
    ) -> None:
        self.runtime = runtime
        self.route_of = route_of  # (method, path) → the route template, for /metrics
        self.shed = settings.shed_at_door
        self.limits = BodyLimits.from_settings(settings)
        self.hold_s = settings.door_hold
        self.allowed = allowed_origins(settings.cors_origins)
        self._lock = threading.Lock()
        self._held: dict[int, Ticket] = {}  # id → tickets the door still owns
        self.refused = 0  # for the queue (503)
        self.too_large = 0  # for the body's size (413)

    @property
    def holding(self) -> int:
        """Places held for requests whose bodies are still arriving."""
        return len(self._held)

    def _settle(self, ticket: Ticket, owner: str) -> Reservation | None:
        with self._lock:
            if ticket.owner != "door":
                return None
            ticket.owner = owner
            self._held.pop(id(ticket), None)
        return ticket.reservation

    def check(self, parser: HTTPRequestParser) -> Ticket | bytes | None:
        """On complete headers: a Ticket (admitted with a place), the bytes of a refusal, or
        None (not an analyze request, or one the view must judge: e.g. invalid options)."""
        too_large = self.check_size(parser, parser.content_length)
        if too_large is not None:
            return too_large
        if not self.shed or parser.command not in METHODS or parser.path not in ANALYZE_PATHS:
            return None
        try:
            _, batcher = self.runtime.model.ready()
            try:
                options = GenerationOptions.from_public(
                    MultiDict(parse_qsl(parser.query or "", keep_blank_values=True))
                )
            except ServiceError:
                return None  # 400 with the view's own message
            group = options.signature()
            try:
                reservation = batcher.reserve(group)
            except Overloaded:
                if not self._lend_stale():
                    raise
                reservation = batcher.reserve(group)
        except ServiceError as exc:
            self.refused += 1
            return self._refusal(parser, exc)
        ticket = Ticket(self, reservation)
        with self._lock:
            self._held[id(ticket)] = ticket
        return ticket

    def oversize(self, parser: HTTPRequestParser, length: int) -> ServiceError | None:
        """The 413 (counted) when `length` bytes of body are more than the route takes."""
        exc = self.limits.refusal(parser.command, parser.path, length)
        if exc is not None:
            self.too_large += 1
        return exc

    def check_size(self, parser: HTTPRequestParser, length: int) -> bytes | None:
        """The bytes of a 413 when `length` bytes of body are more than the route takes."""
        exc = self.oversize(parser, length)
        return None if exc is None else self._refusal(parser, exc)

    def _lend_stale(self) -> bool:
        """Give back the places of requests whose bodies are over `hold_s` late; any?"""
        cutoff = time.monotonic() - self.hold_s
        with self._lock:
            stale = [t for t in self._held.values() if t.taken_at <= cutoff]
            for ticket in stale:
                ticket.owner = "gone"
                del self._held[id(ticket)]
        for ticket in stale:
            ticket.reservation.release()
        if stale:
            log.info("door: %d places held by late uploads given back", len(stale))
        return bool(stale)

    def _refusal(self, parser: HTTPRequestParser, exc: ServiceError) -> bytes:
        """The whole HTTP response for a refused request, as the view would have answered."""
        status, extra = http_mapping(exc)
        state = exc.state if isinstance(exc, NotReady) else "error"
        body = json.dumps(
            error_body(exc.message, state=state), sort_keys=True, separators=(",", ":")
        ).encode("ascii")
        body += b"\n"  # Flask's jsonify ends the body with a newline
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **extra,
            **edge_headers(self.allowed, parser.headers),
            "Connection": "close",
            "Date": email.utils.formatdate(usegmt=True),
            "Server": SERVICE,
        }
        head = f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()
        )
        self.observe(parser, status, len(body), headers[HEADER])
        return head.encode("latin-1") + b"\r\n" + body

    def observe(self, parser: HTTPRequestParser, status: int, size: int, rid: str) -> None:
        """The access line and the request counter of an answer written on the socket thread
        (the door's, waitress's own), as for a request Flask answered."""
        method = parser.command or "-"
        route = self.route_of(method, parser.path)  # never the raw path: bounded labels
        self.runtime.metrics.observe_request(route, method, status, 0.0)
        if not access_log.isEnabledFor(logging.INFO):
            return
        fields = {
            "method": method,
            "path": parser.path,
            "status": status,
            "duration_ms": 0.0,
            "bytes": size,
            "cached": None,
            "door": True,
        }
        token = bind_request_id(rid)
        try:
            access_log.info(
                "%s %s %s 0.0ms %sB cached=- (door)", method, parser.path, status, size,
                extra=fields,
            )  # fmt: skip
        finally:
            unbind_request_id(token)


class DoorParser(HTTPRequestParser):
    """waitress's parser, asking the door once the headers are complete."""

    def __init__(self, adj: Any, channel: DoorChannel | None = None) -> None:
        super().__init__(adj)
        self._channel = channel
        self.ticket: Ticket | None = None

    def received(self, data: bytes) -> int:
        in_headers = not self.headers_finished
        consumed = int(super().received(data))
        channel = self._channel
        if channel is None or not self.headers_finished or self.error is not None or self.empty:
            return consumed
        if in_headers:
            verdict = channel.at_door(self)
        elif self.chunked and self.body_rcv is not None:  # its size is only known as it comes
            verdict = channel.at_door(self, body_size=len(self.body_rcv))
        else:
            return consumed
        if isinstance(verdict, Ticket):
            self.ticket = verdict
        elif isinstance(verdict, InOrderTooLarge):  # answered in turn, by the error task
            self.error = verdict
            self.completed = True
            self.expect_continue = False
            return len(data)
        elif isinstance(verdict, bytes):
            # Refused and answered: the channel drops an empty request, sends no 100 Continue,
            # and this parser swallows what it was given of the body.
            if self.ticket is not None:
                self.ticket.drop()  # refused mid-body: its place goes back
            self.completed = True
            self.empty = True
            self.expect_continue = False
            return len(data)
        return consumed

    def close(self) -> None:
        if self.ticket is not None:
            self.ticket.drop()  # a no-op when the view adopted it
        super().close()


class DoorTask(WSGITask):
    """waitress's WSGI task; the door's ticket rides in the environ, and a response's header
    never leaves without its first body bytes."""

    def write(self, data: bytes) -> None:
        # waitress appends the header and the body to the output in two steps, and the socket
        # thread may send whatever is there in between (any other connection's wake-up lets
        # it). A replica killed right then leaves its client, through HAProxy, a header with no
        # body, which no proxy can retry (seen: the kill -9 scale test, 2026-12-04). The
        # channel's output lock is reentrant (a Condition over an RLock): holding it over both
        # appends keeps the socket thread from sending half of a small response.
        with self.channel.outbuf_lock:
            super().write(data)

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        ticket = getattr(self.request, "ticket", None)
        if ticket is not None:
            environ[ENVIRON_KEY] = ticket
        return environ


class DoorChannel(HTTPChannel):
    """waitress's channel with the door: refusals are written from the socket thread."""

    door: Door
    task_class = DoorTask
    error_task_class = EnvelopeErrorTask
    _lingering_until = 0.0  # set by a refusal: from then on the connection only winds down
    _half_closed = False

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        self.parser_class = functools.partial(DoorParser, channel=self)  # type: ignore[assignment]
        super().__init__(server, sock, addr, adj, map=map)

    def at_door(
        self, parser: DoorParser, body_size: int | None = None
    ) -> Ticket | bytes | InOrderTooLarge | None:
        """Called by the parser (socket thread, under `requests_lock`) on complete headers, or
        with `body_size` as a chunked body grows. Only a request with nothing ahead of it on
        this connection is answered here; behind others (pipelined) only its size is judged,
        and its 413 waits its turn (answers stay in order)."""
        if self._lingering_until:
            return None
        if self.requests:
            size = parser.content_length if body_size is None else body_size
            exc = self.door.oversize(parser, size)
            return None if exc is None else InOrderTooLarge(exc.message)
        try:
            if body_size is None:
                verdict = self.door.check(parser)
            else:
                verdict = self.door.check_size(parser, body_size)
        except Exception:  # the view will judge it; never break the socket thread
            log.exception("door check failed")
            return None
        if isinstance(verdict, bytes):
            self._refuse(verdict)
        return verdict

    def _refuse(self, response: bytes) -> None:
        with self.outbuf_lock:
            self.outbufs[-1].append(response)
            self.current_outbuf_count += len(response)
            self.total_outbufs_len += len(response)
            with contextlib.suppress(OSError):
                self._flush_some()
        self._lingering_until = time.monotonic() + LINGER_S
        self._half_close_when_sent()

    def _half_close_when_sent(self) -> None:
        if self._half_closed or self.total_outbufs_len or not self.connected:
            return
        self._half_closed = True
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)  # the client reads the answer, then EOF

    # -- after a refusal: send, half-close, discard, close ------------------------------------

    def readable(self) -> bool:
        if self._lingering_until:
            return not self.will_close
        return bool(super().readable())

    def handle_write(self) -> None:
        super().handle_write()
        if self._lingering_until:
            self._half_close_when_sent()

    def handle_read(self) -> None:
        if not self._lingering_until:
            super().handle_read()
            return
        try:
            data = self.recv(LINGER_READ)  # b"": the client closed (recv closed this side)
        except OSError:
            self.handle_close()
            return
        if data and time.monotonic() > self._lingering_until:
            self.handle_close()

    def handle_close(self) -> None:
        request = self.request
        if isinstance(request, DoorParser) and request.ticket is not None:
            request.ticket.drop()  # its body will never arrive
        super().handle_close()


def install(server: Any, app: Flask, settings: Settings) -> Door:
    """Put the door on a waitress server (`create_server`'s result); with SHED_AT_DOOR=false
    it only checks body sizes."""
    door = Door(runtime_of(app), settings, functools.partial(route_label, app.url_map))
    server.channel_class = type("BoundDoorChannel", (DoorChannel,), {"door": door})
    return door
