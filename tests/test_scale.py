"""Scale-out on one machine with real engines: three replicas (tiny model), a real redis-server
and a real HAProxy with deploy/haproxy.cfg. Failures are injected while traffic flows; the goal
is zero failed client requests."""

from __future__ import annotations

import io
import random
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import requests

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
