"""The door (http_api/door.py): bodies over their route's limit refused on their headers (413),
chunked and pipelined bodies refused as they grow, what waitress answers itself carried in the
service's envelope, and all of them counted by route, never by path.

Every test runs the service's own HttpServer on 127.0.0.1 around the tiny model and talks to it
over raw sockets, so the test controls how much of a body is ever sent. The queue is in
test_door.py.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

from door_helpers import (
    Served,
    answered_within,
    closed_by_server,
    connect,
    head,
    parse_head,
    post_png,
    read_response,
    wait_for,
)
from door_helpers import serve as serve  # a fixture, imported for pytest
from rest_helpers import two_red_circles


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
