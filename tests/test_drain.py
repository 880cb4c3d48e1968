"""Graceful drain: SIGTERM/SIGINT stop new connections, finish accepted work, then exit 0."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import signal
import time

import pytest
import requests

from rest_helpers import two_red_circles
from service_process import ServiceProcess

PNG = {"Content-Type": "image/png"}


def get_slow(base: str, image_url: str) -> requests.Response:
    """In flight for as long as the image host takes; the caption itself is quick."""
    return requests.get(base + "/v3/analyze", params={"url": image_url}, timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_in_flight_requests_finish_then_the_process_exits(signum: int, http_server) -> None:
    """Six requests in flight (their images come from a slow host, so they reach the model
    during the drain), then the signal: all six get their 200, then the process exits 0."""
    service = ServiceProcess(
        {"MAX_BATCH_SIZE": "1", "CACHE_SIZE": "0", "DRAIN_TIMEOUT": "30"}
    ).start()
    try:
        keep_alive = requests.Session()
        assert keep_alive.get(service.url + "/health", timeout=5).status_code == 200
        data = two_red_circles()
        for i in range(6):  # staggered: they reach the model one after another while draining
            http_server.set(f"/slow{i}.png", data, headers=PNG, delay=1.5 + 0.5 * i)
        with cf.ThreadPoolExecutor(max_workers=6) as pool:
            futures = [
                pool.submit(get_slow, service.url, http_server.url(f"/slow{i}.png"))
                for i in range(6)
            ]
            time.sleep(0.5)  # all six accepted and downloading
            early = [f.result().status_code for f in futures if f.done()]
            assert not early, f"requests should still be in flight, got {early}"
            signalled = time.monotonic()
            service.signal(signum)
            time.sleep(0.3)
            # An open keep-alive connection is still served, and says it is draining.
            health = keep_alive.get(service.url + "/health", timeout=5)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            # New connections are refused at once.
            with pytest.raises(requests.ConnectionError):
                requests.get(service.url + "/health", timeout=5)
            responses = [f.result(timeout=60) for f in futures]
        assert [r.status_code for r in responses] == [200] * 6
        assert all(r.json()["predictions"][0]["text"] for r in responses)
        assert service.proc is not None
        code = service.proc.wait(timeout=30)
        assert code == 0, service.output()
        assert time.monotonic() - signalled < 30
        assert "drained" in service.output()
    finally:
        service.close()


def test_drain_timeout_bounds_the_wait(http_server) -> None:
    """Work that cannot finish within DRAIN_TIMEOUT does not keep the process alive."""
    service = ServiceProcess(
        {"MAX_BATCH_SIZE": "1", "CACHE_SIZE": "0", "DRAIN_TIMEOUT": "1"}
    ).start()
    try:
        http_server.set(
            "/slow.png", two_red_circles(), headers={"Content-Type": "image/png"}, delay=8.0
        )
        with cf.ThreadPoolExecutor(max_workers=4) as pool:
            slow = http_server.url("/slow.png")
            futures = [pool.submit(get_slow, service.url, slow) for _ in range(4)]
            time.sleep(0.5)
            signalled = time.monotonic()
            service.signal(signal.SIGTERM)
            assert service.proc is not None
            assert service.proc.wait(timeout=20) == 0
            assert time.monotonic() - signalled < 10
            for f in futures:
                with contextlib.suppress(requests.RequestException):
                    f.result(timeout=30)  # cut off at the timeout: that is the point
        assert "drain timed out" in service.output()
    finally:
        service.close()
