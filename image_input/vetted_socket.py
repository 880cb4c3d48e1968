"""Connections for `url=` that can only reach vetted addresses and end by one deadline.

urllib3's name-based connect is replaced: this module resolves the host itself (on a bounded
pool, so a hanging resolver cannot outlive the caller's deadline), keeps only addresses the
policy allows, connects to one of them, then checks the address the socket really reached, so
DNS rebinding cannot slip a forbidden address in. Every socket read and write is bound by the
request's wall-clock deadline, so a server that trickles bytes cannot hold a worker.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import Timeout
from urllib3.util.ssl_ import create_urllib3_context

from bounded_io import remaining
from captioning.errors import ImageInputError
from image_input.address_policy import IPAddress, is_address_allowed
from image_input.decode import URL_ERROR

log = logging.getLogger(__name__)

DNS_WORKERS = 4


def url_error(detail: str) -> ImageInputError:
    return ImageInputError(f"{URL_ERROR}: {detail}")


class Resolver:
    """Name look-ups on a small pool this object owns; `close()` ends its threads.

    A look-up that does not answer in time is abandoned (its thread finishes on its own); the
    pool's bound keeps hung look-ups from piling up threads.
    """

    def __init__(self, max_workers: int = DNS_WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="url-dns")

    def getaddrinfo(self, host: str, port: int, timeout: float) -> list[Any]:
        future = self._pool.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        try:
            return future.result(timeout=max(timeout, 0.0))
        except FutureTimeout:
            future.cancel()  # still queued behind hung look-ups: do not run it later
            raise url_error("timed out") from None
        except (OSError, UnicodeError):
            raise url_error("could not resolve host") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


SockAddr = tuple[Any, ...]


def resolve_allowed(
    host: str,
    port: int,
    *,
    allow_private: bool,
    timeout: float,
    resolver: Resolver | None = None,
) -> list[tuple[int, int, int, SockAddr]]:
    """Resolve `host` and keep only the addresses we may connect to (family, type, proto, addr).

    Raises :class:`ImageInputError` ("address not allowed", "could not resolve host" or
    "timed out") when nothing usable remains. Without a `resolver` a one-off one is used.
    """
    host = host.strip("[]")
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        literal = None
    if literal is not None:
        # No DNS for literals; also refuse before anything else so nothing is ever sent.
        if not is_address_allowed(literal, allow_private=allow_private):
            log.info("refused URL host %s: address not allowed", host)
            raise url_error("address not allowed")
        try:
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except (OSError, UnicodeError):
            raise url_error("invalid URL") from None
    else:
        own = resolver is None
        active = Resolver(max_workers=1) if resolver is None else resolver
        try:
            infos = active.getaddrinfo(host.rstrip("."), port, timeout)
        finally:
            if own:
                active.close()
    allowed = []
    for family, socktype, proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if is_address_allowed(str(sockaddr[0]), allow_private=allow_private):
            allowed.append((family, socktype, proto, sockaddr))
    if not allowed:
        log.info("refused URL host %s: address not allowed", host)
        raise url_error("address not allowed")
    return allowed


# --------------------------------------------------------------------------------------------
# Deadline-bound sockets and vetted connections


def time_left(deadline: float) -> float:
    return remaining(deadline, lambda: TimeoutError("deadline exceeded"))


class _DeadlineMixin:
    """Every blocking call ends by `deadline` (monotonic), not merely per call."""

    deadline: float = math.inf

    def _arm(self) -> None:
        if self.deadline != math.inf:
            self.settimeout(time_left(self.deadline))  # type: ignore[attr-defined]

    def recv(self, *args: Any, **kw: Any) -> bytes:
        self._arm()
        return super().recv(*args, **kw)  # type: ignore[misc]

    def recv_into(self, *args: Any, **kw: Any) -> int:
        self._arm()
        return super().recv_into(*args, **kw)  # type: ignore[misc]

    def send(self, *args: Any, **kw: Any) -> int:
        self._arm()
        return super().send(*args, **kw)  # type: ignore[misc]

    def sendall(self, *args: Any, **kw: Any) -> None:
        self._arm()
        super().sendall(*args, **kw)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineMixin, socket.socket):
    """A plain TCP socket bound by the request's deadline."""


class DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    """TLS counterpart of :class:`_DeadlineSocket` (installed via ``SSLContext.sslsocket_class``).

    The handshake is bounded by the socket timeout, which is set to the time left before
    wrapping (CPython applies it to the whole handshake).
    """


def build_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context whose sockets honour the deadline.

    Trusts `cafile`, else the certifi bundle (what requests and so the reference use), else the
    system store.
    """
    ctx = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    if cafile is None:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:  # pragma: no cover - certifi ships with requests
            ctx.load_default_certs()
    if cafile is not None:
        ctx.load_verify_locations(cafile)
    ctx.check_hostname = True
    ctx.sslsocket_class = DeadlineSSLSocket
    return ctx


def open_vetted_socket(
    host: str,
    port: int,
    *,
    deadline: float,
    allow_private: bool,
    resolver: Resolver,
    socket_options: Iterable[tuple[int, int, int]] | None,
) -> socket.socket:
    """Resolve, vet, connect to a vetted address, then vet the peer the socket really reached."""
    try:
        candidates = resolve_allowed(
            host,
            port,
            allow_private=allow_private,
            timeout=time_left(deadline),
            resolver=resolver,
        )
    except TimeoutError:
        raise url_error("timed out") from None
    failure = "connection failed"
    for index, (family, socktype, proto, sockaddr) in enumerate(candidates):
        sock = _DeadlineSocket(family, socktype, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            # Share the time left between the addresses still to try, so one black-holed
            # address (say an unreachable IPv6 one) cannot use up the whole deadline.
            sock.settimeout(time_left(deadline) / (len(candidates) - index))
            sock.connect(sockaddr)
            peer = sock.getpeername()[0]
            if not is_address_allowed(str(peer), allow_private=allow_private):
                log.warning("connected peer for %s is not an allowed address; dropped", host)
                raise url_error("address not allowed")
            sock.deadline = deadline
            sock.settimeout(time_left(deadline))
            return sock
        except ImageInputError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            if index == len(candidates) - 1 or time.monotonic() >= deadline:
                raise url_error("timed out") from None
        except OSError as exc:
            sock.close()
            log.debug("connect to %s failed: %r", host, exc)
            failure = "connection refused" if exc.errno == errno.ECONNREFUSED else failure
    raise url_error(failure)


class _VettedMixin:
    """Replaces urllib3's name-based connect with :func:`_open_vetted_socket`."""

    _dns_host: str
    port: int
    socket_options: Any

    def __init__(
        self,
        *args: Any,
        deadline: float,
        allow_private: bool,
        resolver: Resolver,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._allow_private = allow_private
        self._resolver = resolver

    def _new_conn(self) -> socket.socket:
        return open_vetted_socket(
            self._dns_host,
            self.port,
            deadline=self._deadline,
            allow_private=self._allow_private,
            resolver=self._resolver,
            socket_options=self.socket_options,
        )


class _VettedHTTPConnection(_VettedMixin, HTTPConnection):
    pass


class _VettedHTTPSConnection(_VettedMixin, HTTPSConnection):
    def connect(self) -> None:
        super().connect()  # urllib3 verifies the certificate against the URL's hostname
        if isinstance(self.sock, DeadlineSSLSocket):
            self.sock.deadline = self._deadline


class VettedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _VettedHTTPConnection


class VettedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _VettedHTTPSConnection


def vetted_pool(
    target: Any,
    *,
    deadline: float,
    allow_private: bool,
    resolver: Resolver,
    tls: Callable[[], ssl.SSLContext],
) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to `target` (a parsed http/https URL) that can only reach vetted
    addresses and ends by `deadline`; `tls()` gives the context, asked only for https."""
    left = time_left(deadline)
    https = target.scheme.lower() == "https"
    kwargs: dict[str, Any] = {"deadline": deadline, "allow_private": allow_private}
    if https:
        kwargs["ssl_context"] = tls()
    pool_cls = VettedHTTPSPool if https else VettedHTTPPool
    return pool_cls(
        target.host.strip("[]"),  # IPv6 literals: bare address, explicit port
        target.port or (443 if https else 80),
        timeout=Timeout(connect=left, read=left),
        maxsize=1,
        retries=False,
        resolver=resolver,
        **kwargs,
    )
