"""Turn caller input (raw bytes, a URL or a server-side path) into bytes and an RGB image, safely.

The HTTP layer keeps fetching/reading and decoding as separate calls because its result cache is
keyed by the SHA-256 of the raw bytes. Every failure is an :class:`ImageInputError` whose
``status`` and ``message`` go to the client unchanged, so messages never carry more than the
caller sent plus a short fixed reason (no resolved paths, addresses or exception internals).

``url=`` fetching defends against SSRF: only http/https, and every connection (including each
redirect hop) goes to an address that this module resolved and vetted itself; the address of the
connected socket is checked again, so DNS rebinding cannot slip a forbidden address in. The
socket enforces one wall-clock deadline on every read and write, so a server that trickles bytes
(headers or body) cannot hold a worker past ``timeout``.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import logging
import math
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import urllib3
from PIL import Image, ImageOps
from urllib3 import exceptions as u3exc
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.util import Timeout, make_headers, parse_url
from urllib3.util.ssl_ import create_urllib3_context

log = logging.getLogger(__name__)

# Client-facing message prefixes (CONTRACT.md "How /analyze picks its input").
URL_ERROR = "Failed to download image"
FILE_ERROR = "Failed to load image"
BODY_ERROR = "Invalid image"

#: Filename extensions accepted for multipart uploads (the HTTP layer applies the rule).
ALLOWED_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "bmp", "webp"})
#: Pillow formats we are willing to decode; anything else is refused without touching other
#: (rarely used, historically fragile or external-tool backed) Pillow decoders.
DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO

MAX_REDIRECTS = 5
USER_AGENT = "blip2-caption-service/1.0"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageInputError(Exception):
    """Caller input could not be turned into an image; `status` and `message` go to the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"ImageInputError({self.status}, {self.message!r})"


def too_large_error(max_bytes: int) -> ImageInputError:
    """The one 413 used for every source (url, file, upload), so clients see one message."""
    return ImageInputError(413, f"Image too large: limit is {max_bytes} bytes")


def allowed_filename(name: str) -> bool:
    """The reference's upload rule: the last extension, case-insensitive, is in the allow-list."""
    return "." in name and name.rsplit(".", 1)[1].lower() in ALLOWED_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, *, max_pixels: int, error_prefix: str = BODY_ERROR) -> Image.Image:
    """Decode `data` (whatever the caller claimed it was) into a fully loaded RGB image.

    The pixel count is checked after reading the header and before any pixel is decoded, with
    the limit passed in (Pillow's process-wide ``MAX_IMAGE_PIXELS`` stays as a second fence but
    is not relied on). `error_prefix` picks the contract's wording for the source:
    :data:`BODY_ERROR` for uploads, :data:`FILE_ERROR` for ``file=``, :data:`URL_ERROR` for
    ``url=``.
    """
    if not data:
        raise ImageInputError(400, f"{error_prefix}: empty image data")
    try:
        img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
    except Image.DecompressionBombError:
        raise _bomb_error(None, max_pixels) from None
    except Exception as exc:  # Pillow raises many types for garbage input
        log.debug("image header rejected: %r", exc)
        raise ImageInputError(400, f"{error_prefix}: not a supported image format") from None
    try:
        rgb = _load_rgb(img, max_pixels, error_prefix)
    except BaseException:
        img.close()
        raise
    if rgb is not img:
        img.close()  # the decoded source; the returned image stays usable
    return rgb


def _load_rgb(img: Image.Image, max_pixels: int, error_prefix: str) -> Image.Image:
    """Size check, pixel decode (frame 0), EXIF orientation, then conversion to RGB."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageInputError(400, f"{error_prefix}: invalid image dimensions")
    if width * height > max_pixels:
        raise _bomb_error((width, height), max_pixels)
    try:
        img.load()  # frame 0 for animated GIF/WEBP/PNG and multi-page TIFF
    except Image.DecompressionBombError:
        raise _bomb_error(None, max_pixels) from None
    except Exception as exc:
        log.debug("image data rejected: %r", exc)
        raise ImageInputError(400, f"{error_prefix}: truncated or corrupt image data") from None
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # a broken EXIF block should not cost the caller the image
        log.debug("ignoring unreadable EXIF orientation: %r", exc)
    try:
        rgb = _to_rgb(img)
        rgb.load()
    except Exception as exc:
        log.debug("colour conversion failed for mode %s: %r", img.mode, exc)
        raise ImageInputError(400, f"{error_prefix}: unsupported colour mode") from None
    return rgb


def _bomb_error(size: tuple[int, int] | None, max_pixels: int) -> ImageInputError:
    if size is None:  # Pillow's own process-wide fence fired first; it does not give the size
        fence = Image.MAX_IMAGE_PIXELS
        limit = min(max_pixels, 2 * fence) if fence else max_pixels
        return ImageInputError(400, f"Image too large: exceeds the limit of {limit} pixels")
    w, h = size
    return ImageInputError(
        400, f"Image too large: {w}\u00d7{h} pixels exceeds the limit of {max_pixels}"
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way a photo viewer shows it: transparency on white, high bit depths scaled."""
    mode = img.mode
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        # Pillow's I;16 -> L conversion clips at 255 instead of scaling.
        img = img.convert("I").point(lambda v: v * (1 / 257) + 0.5)
        return img.convert("L").convert("RGB")
    if mode in ("I", "F"):
        return _scale_to_l(img).convert("RGB")
    return img.convert("RGB")


def _scale_to_l(img: Image.Image) -> Image.Image:
    """Map 32-bit integer or float samples to 8 bits by their plausible range."""
    lo, hi = img.getextrema()
    lo, hi = float(lo), float(hi)  # type: ignore[arg-type]
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535:
        scale, offset = 1 / 257, 0.0
    elif hi > lo and math.isfinite(hi - lo):
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
    else:
        scale, offset = 0.0, 0.0
    if img.mode == "I":
        offset += 0.5  # round rather than truncate
    return img.point(lambda v: v * scale + offset).convert("L")


# --------------------------------------------------------------------------------------------
# Address policy


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ALWAYS_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; Linux connects 0.0.0.0 to the local host
        "255.255.255.255/32",
        "100.100.100.200/32",  # Alibaba Cloud metadata (inside the shared 100.64/10 range)
        "fd00:ec2::254/128",  # AWS IMDS over IPv6 (inside the private fc00::/7 range)
    )
)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_address_allowed(address: str | IPAddress, *, allow_private: bool) -> bool:
    """May we connect to this IP? Never to link-local, multicast, reserved or unspecified ones.

    Loopback and private (LAN) addresses are allowed only with `allow_private`. IPv6 forms that
    embed an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that IPv4 address too.
    Anything that does not parse as an IP address is refused.
    """
    if isinstance(address, str):
        try:
            ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))
        except ValueError:
            return False
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_address_allowed(ip.ipv4_mapped, allow_private=allow_private)
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return is_address_allowed(embedded, allow_private=allow_private)
        if ip.sixtofour is not None and not is_address_allowed(
            ip.sixtofour, allow_private=allow_private
        ):
            return False
        if ip.teredo is not None and not is_address_allowed(
            ip.teredo[1], allow_private=allow_private
        ):
            return False
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
        return False
    if any(ip in net for net in _ALWAYS_BLOCKED if net.version == ip.version):
        return False
    if ip.is_loopback:
        return allow_private
    if ip.is_reserved:
        return False
    if ip.is_global:
        return True
    return allow_private  # RFC 1918, ULA, shared/CGNAT, site-local, documentation ranges


SockAddr = tuple[Any, ...]
_dns_pool: ThreadPoolExecutor | None = None
_dns_pool_lock = threading.Lock()


def _dns_executor() -> ThreadPoolExecutor:
    """A small shared pool so a hanging resolver cannot outlive the caller's deadline."""
    global _dns_pool
    with _dns_pool_lock:
        if _dns_pool is None:
            _dns_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-input-dns")
        return _dns_pool


def resolve_allowed(
    host: str, port: int, *, allow_private: bool, timeout: float
) -> list[tuple[int, int, int, SockAddr]]:
    """Resolve `host` and keep only the addresses we may connect to (family, type, proto, addr).

    Raises :class:`ImageInputError` ("address not allowed", "could not resolve host" or
    "timed out") when nothing usable remains.
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
            raise _url_error("address not allowed")
        try:
            infos = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except (OSError, UnicodeError):
            raise _url_error("invalid URL") from None
    else:
        future = _dns_executor().submit(
            socket.getaddrinfo, host.rstrip("."), port, 0, socket.SOCK_STREAM
        )
        try:
            infos = future.result(timeout=max(timeout, 0.0))
        except FutureTimeout:
            future.cancel()  # still queued behind hung look-ups: do not run it later
            raise _url_error("timed out") from None
        except (OSError, UnicodeError):
            raise _url_error("could not resolve host") from None
    allowed = []
    for family, socktype, proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        if is_address_allowed(str(sockaddr[0]), allow_private=allow_private):
            allowed.append((family, socktype, proto, sockaddr))
    if not allowed:
        log.info("refused URL host %s: address not allowed", host)
        raise _url_error("address not allowed")
    return allowed


# --------------------------------------------------------------------------------------------
# Deadline-bound sockets and vetted connections


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline exceeded")
    return left


class _DeadlineMixin:
    """Every blocking call ends by `deadline` (monotonic), not merely per call."""

    deadline: float = math.inf

    def _arm(self) -> None:
        if self.deadline != math.inf:
            self.settimeout(_remaining(self.deadline))  # type: ignore[attr-defined]

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


class _DeadlineSSLSocket(_DeadlineMixin, ssl.SSLSocket):
    """TLS counterpart of :class:`_DeadlineSocket` (installed via ``SSLContext.sslsocket_class``).

    The handshake is bounded by the socket timeout, which is set to the time left before
    wrapping (CPython applies it to the whole handshake).
    """


_ssl_ctx: ssl.SSLContext | None = None
_ssl_ctx_lock = threading.Lock()


def _build_ssl_context(cafile: str | None = None) -> ssl.SSLContext:
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
    ctx.sslsocket_class = _DeadlineSSLSocket
    return ctx


def _ssl_context() -> ssl.SSLContext:
    """The shared client context, built on first HTTPS use (loading CAs costs a few ms)."""
    global _ssl_ctx
    with _ssl_ctx_lock:
        if _ssl_ctx is None:
            _ssl_ctx = _build_ssl_context()
        return _ssl_ctx


def _open_vetted_socket(
    host: str,
    port: int,
    *,
    deadline: float,
    allow_private: bool,
    socket_options: Iterable[tuple[int, int, int]] | None,
) -> socket.socket:
    """Resolve, vet, connect to a vetted address, then vet the peer the socket really reached."""
    try:
        candidates = resolve_allowed(
            host, port, allow_private=allow_private, timeout=_remaining(deadline)
        )
    except TimeoutError:
        raise _url_error("timed out") from None
    failure = "connection failed"
    for index, (family, socktype, proto, sockaddr) in enumerate(candidates):
        sock = _DeadlineSocket(family, socktype, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            # Share the time left between the addresses still to try, so one black-holed
            # address (say an unreachable IPv6 one) cannot use up the whole deadline.
            sock.settimeout(_remaining(deadline) / (len(candidates) - index))
            sock.connect(sockaddr)
            peer = sock.getpeername()[0]
            if not is_address_allowed(str(peer), allow_private=allow_private):
                log.warning("connected peer for %s is not an allowed address; dropped", host)
                raise _url_error("address not allowed")
            sock.deadline = deadline
            sock.settimeout(_remaining(deadline))
            return sock
        except ImageInputError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            if index == len(candidates) - 1 or time.monotonic() >= deadline:
                raise _url_error("timed out") from None
        except OSError as exc:
            sock.close()
            log.debug("connect to %s failed: %r", host, exc)
            failure = "connection refused" if exc.errno == errno.ECONNREFUSED else failure
    raise _url_error(failure)


class _VettedMixin:
    """Replaces urllib3's name-based connect with :func:`_open_vetted_socket`."""

    _dns_host: str
    port: int
    socket_options: Any

    def __init__(self, *args: Any, deadline: float, allow_private: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = deadline
        self._allow_private = allow_private

    def _new_conn(self) -> socket.socket:
        return _open_vetted_socket(
            self._dns_host,
            self.port,
            deadline=self._deadline,
            allow_private=self._allow_private,
            socket_options=self.socket_options,
        )


class _VettedHTTPConnection(_VettedMixin, HTTPConnection):
    pass


class _VettedHTTPSConnection(_VettedMixin, HTTPSConnection):
    def connect(self) -> None:
        super().connect()  # urllib3 verifies the certificate against the URL's hostname
        if isinstance(self.sock, _DeadlineSSLSocket):
            self.sock.deadline = self._deadline


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _VettedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _VettedHTTPSConnection


# --------------------------------------------------------------------------------------------
# url=


def _url_error(detail: str) -> ImageInputError:
    return ImageInputError(400, f"{URL_ERROR}: {detail}")


def _parse_target(url: str) -> Any:
    """Parse and check one hop's URL: http/https with a host; anything else is refused."""
    try:
        parsed = parse_url(url)
    except (u3exc.LocationParseError, ValueError, UnicodeError):
        raise _url_error("invalid URL") from None
    if not parsed.scheme:
        raise _url_error("invalid URL")
    if parsed.scheme.lower() not in ("http", "https"):
        raise _url_error("unsupported URL scheme")
    if not parsed.host or parsed.port == 0:
        raise _url_error("invalid URL")
    return parsed


def fetch_url(url: str, *, max_bytes: int, timeout: float, allow_private: bool) -> bytes:
    """Download `url` (GET, at most 5 redirects) into memory, within `max_bytes` and `timeout`.

    `timeout` is one deadline for the whole exchange: resolution, every connect, TLS handshake,
    headers and body of every hop. Errors: 400 ``Failed to download image: <detail>``; a body
    over `max_bytes` is 413 (:func:`too_large_error`), detected from Content-Length or as soon as
    the streamed body passes the cap.
    """
    deadline = time.monotonic() + timeout
    current = url
    origin_auth: tuple[tuple[str, str, int | None], str] | None = None
    for hop in range(MAX_REDIRECTS + 1):
        target = _parse_target(current)
        origin = (target.scheme, target.host, target.port)
        headers = {
            "User-Agent": USER_AGENT,
            "Accept": "image/*,*/*;q=0.8",
            "Accept-Encoding": "identity",
        }
        if target.auth:
            origin_auth = (origin, target.auth)
        if origin_auth is not None and origin_auth[0] == origin:
            headers.update(make_headers(basic_auth=origin_auth[1]))
        location = _fetch_one(target, headers, max_bytes, deadline, allow_private)
        if isinstance(location, bytes):
            return location
        current = urljoin(current, location)
        log.debug("redirect %d to %s://%s", hop + 1, *_safe_origin(current))
    raise _url_error("too many redirects")


def _safe_origin(url: str) -> tuple[str, str]:
    try:
        p = parse_url(url)
        return p.scheme or "?", p.host or "?"
    except Exception:
        return "?", "?"


def _fetch_one(
    target: Any, headers: dict[str, str], max_bytes: int, deadline: float, allow_private: bool
) -> bytes | str:
    """One GET: the body as bytes, or the Location (str) of a redirect to follow."""
    pool_cls: type[urllib3.HTTPConnectionPool]
    kwargs: dict[str, Any] = {"deadline": deadline, "allow_private": allow_private}
    if target.scheme == "https":
        pool_cls = _HTTPSPool
        kwargs["ssl_context"] = _ssl_context()
    else:
        pool_cls = _HTTPPool
    response = None
    pool = None
    try:
        left = _remaining(deadline)
        pool = pool_cls(
            target.host.strip("[]"),  # IPv6 literals: bare address, explicit port
            target.port or (443 if target.scheme == "https" else 80),
            timeout=Timeout(connect=left, read=left),
            maxsize=1,
            retries=False,
            **kwargs,
        )
        response = pool.urlopen(
            "GET",
            target.request_uri,
            headers=headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
            decode_content=True,
            timeout=Timeout(connect=left, read=left),
        )
        status = response.status
        if status in _REDIRECT_STATUSES and response.headers.get("Location"):
            return str(response.headers["Location"])
        if not 200 <= status < 300:
            raise _url_error(f"HTTP {status}")
        return _read_body(response, max_bytes, deadline)
    except ImageInputError:
        raise
    except Exception as exc:
        raise _url_error(_describe(exc, deadline)) from None
    finally:
        if response is not None:
            response.close()
        if pool is not None:
            pool.close()


def _read_body(response: Any, max_bytes: int, deadline: float) -> bytes:
    """Stream the body into memory, stopping as soon as it passes the cap."""
    declared = response.headers.get("Content-Length")
    encoding = (response.headers.get("Content-Encoding") or "identity").strip().lower()
    if declared is not None and encoding == "identity":
        try:
            if int(declared) > max_bytes:
                raise too_large_error(max_bytes)
        except ValueError:
            pass

    def read_chunk(_wanted: int) -> bytes:
        _remaining(deadline)
        # read1 returns what one socket read (or one bounded decode step) gives.
        return response.read1(_CHUNK, decode_content=True)

    return _read_capped(read_chunk, max_bytes)


def _read_capped(read_chunk: Callable[[int], bytes], max_bytes: int) -> bytes:
    """Read chunks until EOF, refusing with 413 as soon as more than `max_bytes` arrived.

    `read_chunk(n)` gets how many more bytes would still fit (plus one), as a hint.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = read_chunk(max_bytes + 1 - total)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise too_large_error(max_bytes)
        chunks.append(chunk)


def _describe(exc: BaseException, deadline: float) -> str:
    """A short, fixed reason for a transport failure (never the exception text)."""
    log.debug("URL fetch failed: %r", exc)
    if time.monotonic() >= deadline:
        return "timed out"
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(chain) < 16:  # urllib3 wraps causes in args as well as __context__
        cur = todo.pop()
        if any(cur is seen for seen in chain):
            continue
        chain.append(cur)
        todo.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
        todo.extend(a for a in cur.args if isinstance(a, BaseException))
    for kinds, reason in (
        ((TimeoutError, u3exc.TimeoutError), "timed out"),
        ((ssl.SSLCertVerificationError,), "certificate verification failed"),
        ((ssl.SSLError, u3exc.SSLError), "TLS error"),
        ((u3exc.DecodeError,), "could not decode response"),
    ):
        if any(isinstance(e, kinds) for e in chain):
            return reason
    if isinstance(exc, u3exc.HTTPError | OSError):
        return "connection error"
    return "invalid response"


# --------------------------------------------------------------------------------------------
# file=


def read_file(path: str, *, max_bytes: int, roots: tuple[Path, ...] | None) -> bytes:
    """Read a regular file the server can see, within `max_bytes`.

    With `roots` set, the path (after resolving ``..`` and symlinks) must lie inside one of them
    or the caller gets 403 ``Access denied: <path>`` (whether or not it exists). ``None`` keeps
    the reference behaviour: any readable path. Directories, devices, FIFOs and sockets are
    refused without opening them, so a FIFO can never hang the worker.
    """
    not_found = ImageInputError(400, f"File not found: {path}")
    if not path or "\x00" in path:
        raise not_found
    open_path = path
    if roots is not None:
        real = os.path.realpath(path)
        if not _inside(real, roots):
            log.info("file= outside FILE_ROOTS refused")
            raise ImageInputError(403, f"Access denied: {path}")
        open_path = real  # open what we vetted, not a name that could be re-pointed
    try:
        st = os.stat(open_path)
    except (OSError, ValueError):
        raise not_found from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageInputError(400, f"{FILE_ERROR}: not a regular file")
    if st.st_size > max_bytes:
        raise too_large_error(max_bytes)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    if roots is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(open_path, flags)
    except FileNotFoundError:
        raise not_found from None
    except PermissionError:
        raise ImageInputError(400, f"{FILE_ERROR}: permission denied") from None
    except OSError as exc:
        log.debug("open failed: %r", exc)
        if exc.errno == errno.ELOOP:  # swapped for a symlink since we resolved it
            raise ImageInputError(403, f"Access denied: {path}") from None
        raise ImageInputError(400, f"{FILE_ERROR}: could not read file") from None
    try:
        st = os.fstat(fd)  # the object really opened, in case the name changed meanwhile
        if not stat.S_ISREG(st.st_mode):
            raise ImageInputError(400, f"{FILE_ERROR}: not a regular file")
        if roots is not None and not _fd_inside(fd, roots):
            raise ImageInputError(403, f"Access denied: {path}")
        if st.st_size > max_bytes:
            raise too_large_error(max_bytes)
        return _read_capped(lambda wanted: os.read(fd, min(1 << 20, wanted)), max_bytes)
    except OSError as exc:
        log.debug("read failed: %r", exc)
        raise ImageInputError(400, f"{FILE_ERROR}: could not read file") from None
    finally:
        os.close(fd)


def _inside(real: str, roots: tuple[Path, ...]) -> bool:
    target = Path(real)
    return any(target.is_relative_to(os.path.realpath(root)) for root in roots)


def _fd_inside(fd: int, roots: tuple[Path, ...]) -> bool:
    """Where the open descriptor really points (Linux /proc); True where we cannot tell."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return _inside(real, roots)
