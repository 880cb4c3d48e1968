"""The door (http_api/door.py): analyze requests refused on their headers, before the body.

Every test runs the service's own HttpServer (waitress with the door installed) on 127.0.0.1
around the tiny model and talks to it over real sockets: raw ones where the test must control
when the body is sent (or never send it), `requests` where a real client's behaviour matters.
Here: the queue (503 before any body, bursts, keep-alive, Expect: 100-continue, places given
back and lent). Body limits and what waitress answers itself are in test_door_limits.py.
"""

from __future__ import annotations

import json
import time

import requests

from door_helpers import (
    answered_within,
    closed_by_server,
    connect,
    head,
    post_png,
    read_response,
    wait_for,
)
from door_helpers import serve as serve  # a fixture, imported for pytest
from rest_helpers import two_red_circles

BUSY = "Server busy: too many requests queued, retry shortly"


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
