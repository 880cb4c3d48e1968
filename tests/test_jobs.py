"""/v3/jobs end to end: real waitress, real HTTP clients, the tiny-shapes model, a real SQLite
job store and spool under a temporary JOBS_DIR, real local HTTP servers for callbacks.

Lifecycle (202 + Location, status, paging, JSON Lines), the same captions as /v3/analyze,
cancellation within one batch, expiry with spool cleanup, callbacks (delivered; retried with
backoff then given up; SSRF-guarded), the bounds (items, concurrent jobs, disk quota), and the
batcher's priority: bulk work never goes before a waiting interactive request.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests
from test_batch import analyze, images, make_zip

TIMEOUT = 30


def submit(base: str, parts: list[tuple[str, bytes]], **params: Any) -> requests.Response:
    files = [("file", (name, data, "image/png")) for name, data in parts]
    return requests.post(base + "/v3/jobs", files=files, params=params, timeout=TIMEOUT)


def created(resp: requests.Response) -> str:
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert resp.headers["Location"] == f"/v3/jobs/{body['job_id']}"
    assert body["job"]["state"] in ("queued", "running", "done")
    return body["job_id"]


def status(base: str, job_id: str, **params: Any) -> dict[str, Any]:
    resp = requests.get(f"{base}/v3/jobs/{job_id}", params=params, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_state(base: str, job_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = status(base, job_id)
        if body["job"]["state"] in states:
            return body
        assert time.monotonic() < deadline, f"job still {body['job']['state']}: {body['job']}"
        time.sleep(0.05)


def lines(base: str, job_id: str) -> list[dict[str, Any]]:
    resp = requests.get(f"{base}/v3/jobs/{job_id}/results", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines()]


@pytest.fixture
def settings(base_settings, tmp_path: Path):
    return base_settings.with_overrides(cache_size=0, jobs_dir=tmp_path / "jobs")


def test_job_lifecycle_results_match_analyze(serve_app, settings) -> None:
    server = serve_app(settings)
    data = images(12, seed=21)
    parts = [(f"p{i}.png", d) for i, d in enumerate(data)]
    parts.insert(5, ("broken.png", b"not an image"))
    job_id = created(submit(server.url, parts, tags="true"))
    body = wait_state(server.url, job_id, {"done"})
    job = body["job"]
    assert job["counts"] == {
        "total": 13, "pending": 0, "running": 0, "done": 12, "error": 1, "skipped": 0
    }  # fmt: skip
    assert job["progress"] == 1.0 and job["error"] is None and job["callback"] is None
    assert job["created_at"] <= job["started_at"] <= job["finished_at"] < job["expires_at"]
    assert job["options"]["tags"] is True and job["options"]["num_beams"] == 3
    assert job["links"]["results"] == f"/v3/jobs/{job_id}/results"
    streamed = lines(server.url, job_id)
    assert [line["index"] for line in streamed] == list(range(13))
    assert [line["source"] for line in streamed] == [name for name, _ in parts]
    assert streamed[5]["status"] == "error"
    assert streamed[5]["error"] == "Invalid image: not a supported image format"
    good = [line for line in streamed if line["status"] == "success"]
    assert [g["predictions"][0]["text"] for g in good] == [analyze(server.url, d) for d in data]
    assert all(g["predictions"][0]["tags"] for g in good)
    # Pages: offset/limit over the same lines; next_offset until the end.
    first = status(server.url, job_id, offset=0, limit=5)
    assert first["results"] == streamed[:5] and first["page"]["next_offset"] == 5
    last = status(server.url, job_id, offset=10, limit=5)
    assert last["results"] == streamed[10:] and last["page"]["next_offset"] is None
    assert status(server.url, job_id, limit=0)["results"] == []
    for past_the_end in (13, 9223372036854775807, 10**30):  # empty, never a store error
        page = status(server.url, job_id, offset=past_the_end, limit=5)
        assert page["results"] == [] and page["page"]["next_offset"] is None
    for bad in ({"offset": "-1"}, {"limit": "1001"}, {"limit": "x"}):
        resp = requests.get(f"{server.url}/v3/jobs/{job_id}", params=bad, timeout=TIMEOUT)
        assert resp.status_code == 400, bad
    for method in ("get", "delete"):
        missing = requests.request(method, f"{server.url}/v3/jobs/nosuchjob", timeout=TIMEOUT)
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "No job 'nosuchjob' (it may have expired)"
    assert requests.get(f"{server.url}/v3/jobs/nosuchjob/results", timeout=5).status_code == 404
    odd = requests.get(f"{server.url}/v3/jobs/%27%20OR%201%3D1--", timeout=TIMEOUT)
    assert odd.status_code == 404  # an id no store makes is not echoed back
    assert odd.json()["error"]["message"] == "No job with that id (it may have expired)"
    # Cancelling an ended job changes nothing.
    after = requests.delete(f"{server.url}/v3/jobs/{job_id}", timeout=TIMEOUT)
    assert after.status_code == 200 and after.json()["job"]["state"] == "done"


def test_job_from_urls_files_and_zip(serve_app, settings, http_server, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    data = images(4, seed=8)
    (root / "a.png").write_bytes(data[1])
    http_server.set("/0.png", data[0], headers={"Content-Type": "image/png"})
    server = serve_app(settings.with_overrides(file_roots=(root.resolve(),)))
    from_json = created(
        requests.post(
            server.url + "/v3/jobs",
            json={"urls": [http_server.url("/0.png")], "files": [str(root / "a.png")]},
            timeout=TIMEOUT,
        )
    )
    archive = make_zip([("x/c.png", data[2]), ("notes.txt", b"hi"), ("d.png", data[3])])
    from_zip = created(
        requests.post(
            server.url + "/v3/jobs",
            files={"file": ("set.zip", archive, "application/zip")},
            timeout=TIMEOUT,
        )
    )
    wait_state(server.url, from_json, {"done"})
    wait_state(server.url, from_zip, {"done"})
    expected = [analyze(server.url, d) for d in data]
    got = lines(server.url, from_json)
    assert [line["predictions"][0]["text"] for line in got] == expected[:2]
    zipped = lines(server.url, from_zip)
    assert [line["source"] for line in zipped] == [
        "set.zip: x/c.png", "set.zip: notes.txt", "set.zip: d.png"
    ]  # fmt: skip
    assert zipped[1]["error"] == "not an image (JPEG, PNG, GIF, BMP, WEBP or TIFF)"
    texts = [zipped[0]["predictions"][0]["text"], zipped[2]["predictions"][0]["text"]]
    assert texts == expected[2:]
    bad_zip = requests.post(
        server.url + "/v3/jobs",
        files={"file": ("bad.zip", make_zip([("../x.png", data[0])]), "application/zip")},
        timeout=TIMEOUT,
    )
    assert bad_zip.status_code == 400 and "path traversal" in bad_zip.json()["error"]["message"]
    spool = settings.jobs_dir / "spool"
    assert len(list(spool.iterdir())) == 1  # the zip job's (JSON: no uploads; refused: removed)


def test_cancel_stops_within_one_batch_and_keeps_results(serve_app, settings) -> None:
    batch = 4
    server = serve_app(settings.with_overrides(max_batch_size=batch))
    data = images(120, seed=2)
    job_id = created(submit(server.url, [(f"{i}.png", d) for i, d in enumerate(data)]))
    deadline = time.monotonic() + 60
    while status(server.url, job_id)["job"]["counts"]["done"] < 2 * batch:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    resp = requests.delete(f"{server.url}/v3/jobs/{job_id}", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    at_cancel = resp.json()["job"]
    assert at_cancel["state"] == "cancelled"
    time.sleep(1.5)  # anything still running has finished by now
    job = status(server.url, job_id)["job"]
    counts = job["counts"]
    assert job["state"] == "cancelled" and counts["pending"] == 0 and counts["running"] == 0
    assert counts["done"] - at_cancel["counts"]["done"] <= batch, (at_cancel, job)
    assert counts["done"] < 120 - 2 * batch and counts["skipped"] == 120 - counts["done"]
    streamed = lines(server.url, job_id)
    assert len(streamed) == 120
    finished = [line for line in streamed if line["status"] == "success"]
    assert len(finished) == counts["done"]
    assert {line["status"] for line in streamed} == {"success", "skipped"}
    assert all(line["predictions"][0]["text"] for line in finished)


def test_expired_jobs_and_their_uploads_are_removed(serve_app, settings) -> None:
    server = serve_app(settings.with_overrides(jobs_ttl=1.0))
    job_id = created(submit(server.url, [("a.png", images(1)[0])]))
    spool = settings.jobs_dir / "spool"
    assert len(list(spool.iterdir())) == 1
    wait_state(server.url, job_id, {"done"})
    deadline = time.monotonic() + 15
    while requests.get(f"{server.url}/v3/jobs/{job_id}", timeout=TIMEOUT).status_code == 200:
        assert time.monotonic() < deadline, "the job did not expire"
        time.sleep(0.1)
    assert requests.get(f"{server.url}/v3/jobs/{job_id}", timeout=TIMEOUT).status_code == 404
    assert list(spool.iterdir()) == []


class Receiver:
    """Records callback POSTs on a real local HTTP server; answers `status`."""

    def __init__(self, http_server, status: int) -> None:
        self.calls: list[tuple[float, dict[str, Any]]] = []
        self.status = status
        self.got = threading.Event()
        http_server.handle("/hook", self._handle)
        self.url = http_server.url("/hook")

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        self.calls.append((time.monotonic(), json.loads(req.rfile.read(length))))
        self.got.set()
        req.send_response(self.status)
        req.send_header("Content-Length", "0")
        req.end_headers()


def wait_callback_state(base: str, job_id: str, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (job := status(base, job_id)["job"])["callback"]["state"] != state:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_callback_is_posted_when_the_job_ends(serve_app, settings, http_server) -> None:
    server = serve_app(settings)
    receiver = Receiver(http_server, 204)
    job_id = created(
        submit(server.url, [("a.png", images(1)[0])], callback_url=receiver.url, num_beams=2)
    )
    job = wait_callback_state(server.url, job_id, "delivered")
    assert job["callback"] == {"url": receiver.url, "state": "delivered"}
    assert len(receiver.calls) == 1
    sent = receiver.calls[0][1]
    assert sent["job_id"] == job_id and sent["state"] == "done"
    assert sent["counts"]["done"] == 1 and sent["results_url"] == f"/v3/jobs/{job_id}/results"


def test_failing_callback_is_retried_with_backoff_then_given_up(
    serve_app, settings, http_server
) -> None:
    server = serve_app(settings.with_overrides(job_callback_attempts=3, job_callback_backoff=0.3))
    receiver = Receiver(http_server, 500)
    job_id = created(submit(server.url, [("a.png", images(1)[0])], callback_url=receiver.url))
    wait_callback_state(server.url, job_id, "failed")
    time.sleep(1.0)  # no further attempts after giving up
    times = [at for at, _ in receiver.calls]
    assert len(times) == 3
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps  # 0.3 s, then doubled


def test_callback_urls_are_checked_like_url_downloads(serve_app, settings) -> None:
    strict = serve_app(settings.with_overrides(allow_private_urls=False))
    one = [("a.png", images(1)[0])]
    for url, reason in (
        ("http://169.254.169.254/latest/meta-data/", "address not allowed"),
        ("http://127.0.0.1:9/hook", "address not allowed"),
        ("ftp://example.com/hook", "http or https"),
        ("not a url", "not a valid URL"),
    ):
        resp = submit(strict.url, one, callback_url=url)
        assert resp.status_code == 400, (url, resp.text)
        assert reason in resp.json()["error"]["message"], (url, resp.text)


def test_job_bounds(serve_app, settings) -> None:
    server = serve_app(
        settings.with_overrides(
            max_job_items=3, max_jobs=1, jobs_disk_quota=20_000, max_batch_size=1
        )
    )
    pictures = images(3)
    over = submit(server.url, [(f"{i}.png", pictures[0]) for i in range(4)])
    assert over.status_code == 413
    assert over.json()["error"]["message"] == "too many images: at most 3 per request, got 4"
    too_big = submit(server.url, [("big.png", b"\x89PNG" + bytes(25_000))])
    assert too_big.status_code == 507
    assert "JOBS_DISK_QUOTA" in too_big.json()["error"]["message"]
    assert list((settings.jobs_dir / "spool").iterdir()) == []  # nothing left behind
    # One job at a time: a second one while the first is unfinished gets 429 + Retry-After.
    slow = {"num_beams": "10", "max_length": "60", "min_length": "60"}  # ~3 s for 3 images
    first = created(submit(server.url, [(f"{i}.png", p) for i, p in enumerate(pictures)], **slow))
    second = submit(server.url, [("a.png", pictures[0])])
    assert second.status_code == 429, second.text
    assert int(second.headers["Retry-After"]) > 0
    assert "already queued or running" in second.json()["error"]["message"]
    wait_state(server.url, first, {"done"})
    created(submit(server.url, [("a.png", pictures[0])]))


def test_bulk_work_never_goes_before_a_waiting_interactive_request() -> None:
    """The batcher itself: with bulk items queued, an interactive request submitted later runs
    in the next batch; the bulk queue has its own bound."""
    from captioning.batcher import BULK, Batcher

    ran: list[list[str]] = []
    gate = threading.Event()

    def run_batch(items, _options):
        gate.wait(5)
        ran.append(list(items))
        return [item.upper() for item in items]

    batcher: Batcher[str, str] = Batcher(
        run_batch, max_batch_size=2, batch_wait_ms=0, max_queue=4, max_bulk_queue=8
    ).start()
    try:
        far = time.monotonic() + 30
        first = batcher.submit("b0", None, "g", far, BULK)  # runs first, held at the gate
        time.sleep(0.1)
        bulk = [batcher.submit(f"b{i}", None, "g", far, BULK) for i in range(1, 5)]
        urgent = batcher.submit("i0", None, "other", far)
        gate.set()
        assert urgent.result(5) == "I0" and first.result(5) == "B0"
        assert [f.result(5) for f in bulk] == ["B1", "B2", "B3", "B4"]
        assert ran[0] == ["b0"] and ran[1] == ["i0"]  # ahead of four queued bulk items
        with pytest.raises(ValueError):
            batcher.submit("x", None, "g", far, "urgent")
        gate.clear()
        batcher.submit("hold", None, "g", far, BULK)
        time.sleep(0.1)  # the worker holds it at the gate; the queue is empty
        for i in range(8):
            batcher.submit(f"q{i}", None, "g", far, BULK)
        with pytest.raises(Exception, match="too many requests queued"):
            batcher.submit("q9", None, "g", far, BULK)  # the bulk queue has its own bound
        batcher.submit("i1", None, "g", far)  # the interactive queue still takes work
    finally:
        gate.set()
        batcher.stop()
