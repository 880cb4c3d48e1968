"""Scale-out on one machine with real engines: three replicas (tiny model), a real redis-server
and a real HAProxy with deploy/haproxy.cfg. Failures are injected while traffic flows; the goal
is zero failed client requests."""

from __future__ import annotations

import io
import json
import random
import signal
import threading
import time
import zipfile
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from tiny_shapes import Scene, draw

CLIENTS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    made = Cluster(replicas=3)
    yield made
    made.close()


def shapes_png(seed: int) -> bytes:
    """A tiny-shapes image; different seeds give different bytes (no cache hits)."""
    rng = random.Random(seed)
    scene = Scene(
        rng.randint(1, 3),
        rng.choice(["red", "blue", "green"]),
        rng.choice(["circle", "square"]),
        rng.choice(["gray", "white"]),
    )
    buf = io.BytesIO()
    draw(scene, rng).save(buf, "PNG")
    return buf.getvalue()


def post(base: str, data: bytes) -> requests.Response:
    return requests.post(
        base + "/v3/analyze", files={"file": ("s.png", data, "image/png")}, timeout=60
    )


class ClosedLoop:
    """CLIENTS clients, each sending its next request as soon as the last one answered."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)
        ]

    def __enter__(self) -> ClosedLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=90)

    def _client(self, client: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                resp = post(self.base, shapes_png(client * 1_000_000 + n))
                good = resp.status_code == 200 and resp.json()["predictions"][0]["text"]
                outcome = None if good else f"{resp.status_code} {resp.text[:200]}"
            except requests.RequestException as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        start = self.ok
        while self.ok - start < count and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_result_cached_through_one_replica_is_a_hit_through_another(cluster) -> None:
    a, b = cluster.replicas[0], cluster.replicas[1]
    data = shapes_png(424242)
    first = post(a.url, data).json()
    second = post(b.url, data).json()
    assert "cached" not in first["metadata"]
    assert second["metadata"]["cached"] is True
    assert second["predictions"] == first["predictions"]


def test_kill_9_of_one_replica_fails_no_client_request(cluster) -> None:
    with ClosedLoop(cluster.url) as load:
        load.wait_for(40)
        before = load.ok
        cluster.replicas[2].kill()  # a crash: in-flight requests there get an empty reply
        load.wait_for(40, timeout=120)
        after = load.ok
    assert load.failures == [], load.failures[:5]
    assert after - before >= 40, "traffic must go on after the kill"
    cluster.restart(2)
    cluster.haproxy.wait_replicas_up(3)


def test_rolling_restart_with_drain_fails_no_client_request(cluster) -> None:
    with ClosedLoop(cluster.url) as load:
        load.wait_for(20)
        for index in range(len(cluster.replicas)):
            replica = cluster.replicas[index]
            replica.signal(signal.SIGTERM)  # drain: finish in-flight, refuse new connections
            assert replica.proc is not None
            assert replica.proc.wait(timeout=60) == 0, replica.output()
            cluster.restart(index)
            cluster.haproxy.wait_replicas_up(3)
            load.wait_for(10)
    assert load.failures == [], load.failures[:5]


JOB_SEEDS = 100_000_000  # above every ClosedLoop client's seeds (client * 1_000_000 + n)


def zip_of(count: int) -> bytes:
    """A job's images. Their seeds must be none a ClosedLoop client posted earlier in this
    module: the replicas share one Redis result cache, and cached items never reach a model
    (7_000_000 + i collided with client 7 once the service got fast enough to post 600)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"img{i:04d}.png", shapes_png(JOB_SEEDS + i))
    return buf.getvalue()


def bulk_images_run(base: str) -> float:
    """Job items this replica took from its bulk queue (its own /metrics)."""
    text = requests.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "blip2_queue_wait_seconds_count" and (
                sample.labels.get("priority") == "bulk"
            ):
                return sample.value
    return 0.0


def job_view(base: str, job_id: str) -> dict:
    resp = requests.get(f"{base}/v3/jobs/{job_id}", params={"limit": 0}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["job"]


def test_a_job_finishes_exactly_once_when_a_replica_dies_mid_job(cluster) -> None:
    """600 images through HAProxy; their items spread over the replicas by the Redis stream;
    one replica is killed mid-job and its claimed items are reclaimed after JOB_CLAIM_TIMEOUT."""
    resp = requests.post(
        cluster.url + "/v3/jobs",
        files={"file": ("images.zip", zip_of(600), "application/zip")},
        timeout=120,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    deadline = time.monotonic() + 300
    while job_view(cluster.url, job_id)["progress"] < 0.2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cluster.replicas[1].kill()
    view = job_view(cluster.url, job_id)
    assert view["state"] == "running", view
    while view["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        view = job_view(cluster.url, job_id)
    assert view["state"] == "done", view
    assert view["counts"]["done"] == 600 and view["counts"]["error"] == 0, view["counts"]
    lines = requests.get(f"{cluster.url}/v3/jobs/{job_id}/results", timeout=60).text.splitlines()
    results = [json.loads(line) for line in lines]
    assert sorted(r["index"] for r in results) == list(range(600))  # each item exactly once
    assert all(r["status"] == "success" and r["predictions"][0]["text"] for r in results)
    # Both surviving replicas ran job items (the stream spread them).
    for survivor in (cluster.replicas[0], cluster.replicas[2]):
        assert bulk_images_run(survivor.url) > 0
    cluster.restart(1)
    cluster.haproxy.wait_replicas_up(3)
