"""The door (http_api/door.py): analyze requests refused on their headers, before the body.

Every test runs the service's own HttpServer (waitress with the door installed) on 127.0.0.1
around the tiny model and talks to it over real sockets: raw ones where the test must control
when the body is sent (or never send it), `requests` where a real client's behaviour matters.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from rest_helpers import two_red_circles

BUSY = "Server busy: too many requests queued, retry shortly"


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


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> list[tuple[int, dict, bytes]]:
    """Every response the server sends until it ends the connection, in order (pipelined
    answers can arrive in one segment, so they are split here, not read one at a time)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    answers = []
    while data:
        raw_head, data = data.split(b"\r\n\r\n", 1)
        status, headers = parse_head(raw_head)
        length = int(headers["content-length"])
        answers.append((status, headers, data[:length]))
        data = data[length:]
    return answers


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


def test_refused_on_its_headers_with_the_envelope_and_the_connection_closed(serve) -> None:
    from captioning.options import GenerationOptions

    served = serve(max_queue=1)
    held = served.runtime.pipeline.admit(GenerationOptions())  # another caller has the place
    try:
        sock = connect(served)
        started = time.monotonic()
        sock.sendall(head(length=20_000_000, extra="X-Request-ID: door-test-1\r\n"))
        status, headers, body = read_response(sock)  # not one byte of the 20 MB body sent
        took = time.monotonic() - started
        assert status == 503
        assert took < 1.0, took
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert headers["content-type"] == "application/json"
        assert headers["x-request-id"] == "door-test-1"
        assert json.loads(body) == {
            "error": {"message": BUSY},
            "metadata": {"processing_time": 0.0},
            "predictions": [],
            "service": "blip2",
            "status": "error",
        }
        assert closed_by_server(sock)
        sock.close()
        health = requests.get(served.url + "/health", timeout=2)
        assert health.status_code == 200
        assert health.elapsed.total_seconds() < 1.0
        assert served.batcher.reserved == 1 and served.server.door.holding == 0
    finally:
        held.release()
    assert post_png(served, two_red_circles()).status_code == 200
    assert served.batcher.reserved == 0


def test_the_door_answers_as_the_view_does(serve) -> None:
    """Same status, headers that matter and body (but the clock) with and without the door;
    a GET is refused at the door too."""
    from captioning.options import GenerationOptions

    answers = []
    for at_door in (True, False):
        served = serve(max_queue=1, shed_at_door=at_door)
        assert served.server.door.shed is at_door
        held = served.runtime.pipeline.admit(GenerationOptions())
        try:
            for method in ("post", "get"):
                kw = (
                    {"files": {"file": ("image.jpg", two_red_circles())}}
                    if method == "post"
                    else {}
                )
                resp = requests.request(method, served.url + "/v3/analyze?url=x", timeout=5, **kw)
                body = resp.json()
                body["metadata"].pop("processing_time")
                answers.append((method, resp.status_code, resp.headers.get("Retry-After"), body))
        finally:
            held.release()
    assert answers[:2] == answers[2:]
    assert answers[0][1] == 503 and answers[0][3]["error"]["message"] == BUSY


def test_a_burst_gets_exactly_the_queue_places_and_the_rest_503_before_any_body(
    serve,
) -> None:
    image = two_red_circles()
    served = serve(max_queue=3)
    socks = [connect(served) for _ in range(10)]
    for sock in socks:
        sock.sendall(head(length=len(image)))
    assert wait_for(lambda: served.server.door.refused == 7)
    refused = [s for s in socks if answered_within(s, 0.5)]
    admitted = [s for s in socks if s not in refused]
    assert len(refused) == 7 and len(admitted) == 3
    assert served.batcher.reserved == 3 and served.server.door.holding == 3
    for sock in refused:
        status, headers, _ = read_response(sock)
        assert (status, headers["retry-after"]) == (503, "1")
        sock.close()
    for sock in admitted:  # the places were held for them: none is refused in the view
        sock.sendall(image)
    for sock in admitted:
        status, _, body = read_response(sock, timeout=30)
        assert status == 200, body
        assert json.loads(body)["predictions"][0]["text"]
        sock.close()
    assert wait_for(lambda: served.batcher.reserved == 0)
    assert served.server.door.holding == 0


def test_admitted_uploads_work_and_keep_alive_stays(serve) -> None:
    image = two_red_circles()
    served = serve(max_queue=2)
    sock = connect(served)
    for _ in range(2):  # two requests on one connection
        sock.sendall(head(length=len(image)) + image)
        status, headers, body = read_response(sock, timeout=30)
        assert status == 200, body
        assert headers.get("connection", "").lower() != "close"
    sock.close()
    with requests.Session() as session:  # multipart like the orchestrator, one connection
        for _ in range(2):
            files = {"file": ("image.jpg", image, "image/jpeg")}
            assert session.post(served.url + "/analyze", files=files).status_code == 200
    assert served.batcher.reserved == 0 and served.server.door.holding == 0


def test_expect_continue_gets_the_503_instead_of_100(serve) -> None:
    from captioning.options import GenerationOptions

    image = two_red_circles()
    served = serve(max_queue=1)
    held = served.runtime.pipeline.admit(GenerationOptions())
    sock = connect(served)
    sock.sendall(head(length=len(image), extra="Expect: 100-continue\r\n"))
    assert read_response(sock)[0] == 503
    sock.close()
    held.release()
    sock = connect(served)
    sock.sendall(head(length=len(image), extra="Expect: 100-continue\r\n"))
    sock.settimeout(5)
    assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    sock.sendall(image)
    assert read_response(sock, timeout=30)[0] == 200
    sock.close()


def test_a_client_gone_mid_body_gives_its_place_back(serve) -> None:
    image = two_red_circles()
    served = serve(max_queue=1)
    sock = connect(served)
    sock.sendall(head(length=len(image)) + image[: len(image) // 2])
    assert wait_for(lambda: served.server.door.holding == 1)
    assert served.batcher.reserved == 1
    sock.close()
    assert wait_for(lambda: served.batcher.reserved == 0 and served.server.door.holding == 0)
    assert post_png(served, image).status_code == 200


def test_a_late_body_lends_its_place_to_a_newer_request(serve) -> None:
    """DOOR_HOLD: a place held for a body that does not come is lent under overload; the late
    request then asks the queue again in the view (and is refused there: no place left)."""
    image = two_red_circles()
    served = serve(max_queue=1, door_hold=0.3)
    late = connect(served)
    late.sendall(head(length=len(image)))
    assert wait_for(lambda: served.server.door.holding == 1)
    early = connect(served)
    early.sendall(head(length=len(image)))  # the place is not stale yet
    assert read_response(early)[0] == 503
    early.close()
    time.sleep(0.4)
    newer = connect(served)
    newer.sendall(head(length=len(image)))
    assert not answered_within(newer, 0.3)  # admitted with the lent place
    assert served.batcher.reserved == 1 and served.server.door.holding == 1
    late.sendall(image)
    status, _, body = read_response(late, timeout=30)
    assert status == 503 and json.loads(body)["error"]["message"] == BUSY
    newer.sendall(image)
    assert read_response(newer, timeout=30)[0] == 200
    late.close()
    newer.close()
    assert wait_for(lambda: served.batcher.reserved == 0)


def test_requests_uploading_a_big_body_reads_the_503(serve) -> None:
    """A client that writes its whole body before reading (requests) gets the answer, not a
    reset: the door half-closes and discards what is still sent."""
    from captioning.options import GenerationOptions

    served = serve(max_queue=1)
    held = served.runtime.pipeline.admit(GenerationOptions())
    try:
        for _ in range(3):
            files = {"file": ("image.jpg", b"\xff" * 8_000_000, "image/jpeg")}
            resp = requests.post(served.url + "/analyze", files=files, timeout=10)
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
            assert resp.json()["error"]["message"] == BUSY
    finally:
        held.release()


def test_invalid_options_are_left_to_the_view_and_loading_is_refused_at_the_door(
    serve,
) -> None:
    from captioning.options import GenerationOptions

    served = serve(max_queue=1)
    held = served.runtime.pipeline.admit(GenerationOptions())
    try:
        resp = requests.get(served.url + "/analyze?url=x&max_length=abc", timeout=5)
        assert resp.status_code == 400  # the view's own message, not a door 503
        assert served.server.door.refused == 0
    finally:
        held.release()
    loading = serve(captioner=None)  # never started: the model is "loading"
    sock = connect(loading)
    sock.sendall(head())
    status, headers, body = read_response(sock)
    assert (status, headers["retry-after"]) == (503, "1")
    assert json.loads(body)["status"] == "loading"
    sock.close()


# ----------------------------------------------------------------------------- body limits


@pytest.mark.parametrize("at_door", [True, False])
def test_a_body_over_its_routes_limit_is_413_on_its_headers(serve, at_door: bool) -> None:
    """Nothing of the body is read: waitress would otherwise spool it whole (up to its 1 GiB
    backstop) before Flask's 413. Checked with and without shedding at the door."""
    served = serve(max_file_size=100_000, max_batch_bytes=200_000, shed_at_door=at_door)
    for path, length, message in (
        ("/analyze", 100_001, "Image too large: limit is 100000 bytes"),
        ("/v3/analyze", 300_000_000, "Image too large: limit is 100000 bytes"),
        ("/health", 100_001, "Image too large: limit is 100000 bytes"),
        ("/v3/batch", 200_000 + (1 << 20) + 1, "the request is larger than 200000 bytes "
         "(MAX_BATCH_BYTES)"),
    ):  # fmt: skip
        sock = connect(served)
        sock.sendall(head(path=path, length=length))
        status, headers, body = read_response(sock)
        assert status == 413, (path, body)
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["message"] == message
        assert closed_by_server(sock)
        sock.close()
    assert served.server.door.too_large == 4 and served.server.door.refused == 0
    assert served.batcher.reserved == 0
    batch = connect(served)  # within the batch limit, over the image one: the body may come
    batch.sendall(head(path="/v3/batch", length=150_000, content_type="application/zip"))
    assert not answered_within(batch, 0.3)
    batch.close()
    assert requests.get(served.url + "/health", timeout=2).status_code == 200


def test_a_chunked_body_is_refused_as_it_grows_past_the_limit(serve) -> None:
    served = serve(max_file_size=100_000)
    sock = connect(served)
    sock.sendall(
        b"POST /analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    assert wait_for(lambda: served.server.door.holding == 1)  # admitted with a queue place
    chunk = b"%x\r\n" % 8192 + b"\0" * 8192 + b"\r\n"
    sent = 0
    while sent < 100_000 and not answered_within(sock, 0):
        sock.sendall(chunk)
        sent += 8192
    sock.sendall(chunk)  # past the limit: answered without the rest (nor its last chunk)
    status, _, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["message"] == "Image too large: limit is 100000 bytes"
    assert served.server.door.too_large == 1
    assert wait_for(lambda: served.batcher.reserved == 0 and served.server.door.holding == 0)
    sock.close()
    assert post_png(served, two_red_circles()).status_code == 200


def test_a_pipelined_body_over_the_limit_gets_its_413_in_turn_without_its_body(serve) -> None:
    served = serve(max_file_size=100_000)
    sock = connect(served)
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock.sendall(health + head(length=300_000_000) + b"\0" * 1000)  # one segment: pipelined
    # no more of the body is ever sent: both answers come, then the server closes
    (first, _, _), (status, headers, body) = read_until_closed(sock)
    assert (first, status) == (200, 413)
    assert json.loads(body)["error"]["message"] == "Image too large: limit is 100000 bytes"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    sock.close()
    assert served.server.door.too_large == 1 and served.batcher.reserved == 0


@pytest.mark.parametrize(
    ("request_head", "status", "fragment"),
    [
        (head(length=-5), 400, "Bad Request"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 300_000 + b"\r\n\r\n", 431, ""),
        (b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000000\r\n\r\n", 413, ""),
        (head(extra="Transfer-Encoding: gzip\r\n"), 501, "Not Implemented"),
    ],
)
def test_what_waitress_answers_itself_is_the_envelope(
    serve, request_head: bytes, status: int, fragment: str
) -> None:
    served = serve()
    sock = connect(served)
    sock.sendall(request_head)
    got, headers, body = read_response(sock)
    sock.close()
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert (
        len(headers["x-request-id"]) == 32
        and "Retry-After" in headers["access-control-expose-headers"]
    )
    answer = json.loads(body)
    assert answer["status"] == "error" and answer["predictions"] == []
    assert fragment in answer["error"]["message"]
    assert "Traceback" not in answer["error"]["message"]
    assert any(f'status="{status}"' in line for line in counted(served))


def counted(served: Served) -> list[str]:
    text = requests.get(served.url + "/metrics", timeout=5).text
    return [line for line in text.splitlines() if line.startswith("blip2_http_requests_total{")]


def test_answers_before_flask_are_counted_by_route_never_by_path(serve) -> None:
    """413s on the headers and waitress's own 400s, to any path: labelled by route template
    (`unmatched` for no route), so clients cannot grow /metrics; a client's request id stays."""
    served = serve(max_file_size=1000)
    paths = [f"/no/such/{i}" for i in range(12)] + ["/v3/jobs/abc", "/analyze", "/v3//analyze"]
    for path in paths:
        sock = connect(served)
        sock.sendall(head(path=path, length=5000, method="GET", extra="X-Request-ID: probe-7\r\n"))
        status, headers, _ = read_response(sock)
        sock.close()
        assert (status, headers["x-request-id"]) == (413, "probe-7")
    sock = connect(served)
    sock.sendall(b"GET /what HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\nX-Request-ID: p8\r\n\r\n")
    status, headers, _ = read_response(sock)
    sock.close()
    assert (status, headers["x-request-id"]) == (400, "p8")
    lines = counted(served)
    assert not any("/no/such" in line or "/what" in line for line in lines), lines
    assert 'blip2_http_requests_total{method="GET",route="unmatched",status="413"} 13.0' in lines
    assert 'blip2_http_requests_total{method="GET",route="unmatched",status="400"} 1.0' in lines
    for route in ("/v3/jobs/<job_id>", "/analyze"):
        assert (
            f'blip2_http_requests_total{{method="GET",route="{route}",status="413"}} 1.0' in lines
        )
