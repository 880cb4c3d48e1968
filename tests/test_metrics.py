"""GET /metrics scraped from a real waitress server after real traffic (tiny-shapes model), parsed
with prometheus_client's own text parser; and the batcher's observer hooks on their own."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Sequence

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from captioning.batcher import Batcher
from rest_helpers import assert_success, two_red_circles

HEAVY = {"num_beams": 10, "min_length": 75, "max_length": 75}


class Scrape:
    """One parsed /metrics answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def labelled(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for (n, labels) in self.samples if n == name]


def scrape(base: str) -> Scrape:
    resp = requests.get(base + "/metrics", timeout=5)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return Scrape(resp.text)


def post_png(base: str, data: bytes, path: str = "/v3/analyze", **params: object):
    return requests.post(
        base + path, data=data, params=params, headers={"Content-Type": "image/png"}, timeout=60
    )


def threads_of_a_new_thread() -> int:
    """torch's thread count as a thread started now sees it (as the batcher's worker did)."""
    import torch

    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


def test_metrics_follow_real_traffic(serve_app, base_settings) -> None:
    server = serve_app(base_settings)
    other = serve_app(base_settings)  # a second runtime in the same process
    data = two_red_circles()
    before = scrape(server.url)
    assert before.value("blip2_http_requests_total", route="/v3/analyze", method="POST") is None
    first = assert_success(post_png(server.url, data))
    second = assert_success(post_png(server.url, data))
    assert "cached" not in first["metadata"] and second["metadata"]["cached"] is True
    assert requests.get(server.url + "/no/such/page", timeout=5).status_code == 404
    secret = requests.get(server.url + "/analyze", params={"file": "/secret/cat.png"}, timeout=5)
    assert secret.status_code == 400  # no such file; the query must not become a label
    assert requests.request("BREW", server.url + "/health", timeout=5).status_code == 405

    m = scrape(server.url)
    requests_total = "blip2_http_requests_total"
    assert m.types["blip2_http_requests"] == "counter"
    assert m.value(requests_total, route="/v3/analyze", method="POST", status="200") == 2
    assert m.value(requests_total, route="unmatched", method="GET", status="404") == 1
    assert m.value(requests_total, route="/analyze", method="GET", status="400") == 1
    assert m.value(requests_total, route="unmatched", method="other", status="405") == 1
    assert m.value(requests_total, route="/metrics", method="GET", status="200") == 1  # before
    latency = "blip2_http_request_duration_seconds"
    assert m.value(latency + "_count", route="/v3/analyze") == 2
    assert m.value(latency + "_sum", route="/v3/analyze") > 0
    # One model batch of one image (the second answer came from the cache).
    assert m.value("blip2_model_batch_size_count") == 1
    assert m.value("blip2_model_batch_size_sum") == 1
    assert m.value("blip2_model_batch_duration_seconds_count") == 1
    assert m.value("blip2_model_batch_duration_seconds_sum") > 0
    assert m.value("blip2_queue_wait_seconds_count", priority="interactive") == 1
    assert m.value("blip2_queue_wait_seconds_count", priority="bulk") is None
    assert m.value("blip2_bulk_queue_depth") == 0
    assert m.value("blip2_cache_hits_total") == 1
    assert m.value("blip2_cache_misses_total") == 1
    assert m.value("blip2_queue_depth") == 0
    assert m.value("blip2_queue_capacity") == base_settings.max_queue
    assert m.value("blip2_model_busy") == 0
    assert m.value("blip2_model_state", state="loaded") == 1
    assert m.value("blip2_model_state", state="loading") == 0
    assert m.value("blip2_model_state", state="error") == 0
    assert m.value("blip2_model_load_seconds") >= 0
    # TORCH_THREADS unset: the count is chosen before each batch (every core while quiet, one
    # beside a busy process); the one batch ran on the count the gauge shows.
    name = "blip2_model_thread_batches_total"
    ran = {labels["threads"]: m.value(name, **labels) for labels in m.labelled(name)}
    assert set(ran) == {str(n) for n in range(1, threads_of_a_new_thread() + 1)}
    assert sum(ran.values()) == m.value("blip2_model_batch_size_count") == 1
    assert ran[str(int(m.value("blip2_model_threads")))] == 1
    assert m.value("blip2_draining") == 0
    assert m.value("blip2_emoji_config_source", source="bundled") == 1  # AUTO_UPDATE=false
    assert m.value("blip2_emoji_config_source", source="remote") == 0
    assert m.value("blip2_http_requests_in_flight") == 1  # the scrape itself
    # Bounded labels: no file name, query or request id ever appears.
    assert "secret" not in m.text and "cat.png" not in m.text and "no/such" not in m.text
    for labels in m.labelled(requests_total):
        assert set(labels) == {"route", "method", "status"}
    # The other runtime's registry saw none of it.
    o = scrape(other.url)
    assert o.value(requests_total, route="/v3/analyze", method="POST", status="200") is None
    assert o.value("blip2_model_batch_size_count") == 0
    assert o.value("blip2_cache_misses_total") == 0


def test_metrics_of_a_runtime_still_loading(base_settings) -> None:
    from captioning.runtime import Runtime
    from REST import create_app
    from servers import RunningServer

    runtime = Runtime(base_settings)  # never started: loading, no emoji config, no batcher
    server = RunningServer(create_app(runtime))
    try:
        resp = requests.post(
            server.url + "/v3/analyze", data=b"x", headers={"Content-Type": "image/png"}, timeout=5
        )
        assert resp.status_code == 503
        m = scrape(server.url)
        assert m.value("blip2_model_state", state="loading") == 1
        assert m.value("blip2_model_state", state="loaded") == 0
        assert m.value("blip2_model_load_seconds") is None
        assert m.value("blip2_model_threads") is None
        assert m.labelled("blip2_model_thread_batches_total") == []
        assert m.value("blip2_queue_depth") == 0
        assert m.value("blip2_queue_capacity") == base_settings.max_queue
        sources = [m.value("blip2_emoji_config_source", source=s) for s in ("remote", "bundled")]
        assert sources == [0, 0]
        assert m.value("blip2_emoji_config_age_seconds") is None
        shed = {"route": "/v3/analyze", "method": "POST", "status": "503"}
        assert m.value("blip2_http_requests_total", **shed) == 1
        runtime.model.set_failed("checkpoint missing")
        assert scrape(server.url).value("blip2_model_state", state="error") == 1
    finally:
        server.close()
        runtime.stop()


def test_scrapes_answer_while_the_model_is_busy(serve_app, base_settings) -> None:
    """A scrape reads counters only: while the worker runs a multi-second batch and more work
    waits in the queue, /metrics answers at once and shows that state."""
    server = serve_app(base_settings.with_overrides(cache_size=0, max_batch_size=2))
    data = two_red_circles()
    seen_busy = seen_queued = False
    times: list[float] = []
    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(post_png, server.url, data, **HEAVY) for _ in range(6)]
        while not all(f.done() for f in futures):
            started = time.perf_counter()
            m = scrape(server.url)
            times.append(time.perf_counter() - started)
            seen_busy |= m.value("blip2_model_busy") == 1
            seen_queued |= (m.value("blip2_queue_depth") or 0) >= 1
            time.sleep(0.02)
        assert all(f.result().status_code == 200 for f in futures)
    assert seen_busy and seen_queued
    m = scrape(server.url)
    assert m.value("blip2_model_batch_size_sum") == 6
    assert m.value("blip2_model_batch_size_count") >= 3  # at most 2 images per batch
    batch_seconds = m.value("blip2_model_batch_duration_seconds_sum")
    assert batch_seconds > 0.5, "the heavy batches should take a while"
    # A scrape that waited for the running batch would take half a batch on average; these
    # only compete for the CPU with the model (2 cores here: median ~10 ms, worst ~0.5 s).
    mean_batch = batch_seconds / m.value("blip2_model_batch_duration_seconds_count")
    median = sorted(times)[len(times) // 2]
    assert median < min(0.1, mean_batch / 4), (median, mean_batch)


# ----------------------------------------------------------------------------- batcher hooks


def test_batcher_reports_batches_and_queue_waits() -> None:
    gate = threading.Event()
    batches: list[tuple[int, float]] = []
    waits: list[tuple[float, str]] = []

    def run(items: Sequence[str], options: object) -> list[str]:
        gate.wait(5)
        time.sleep(0.05)
        return list(items)

    batcher = Batcher(
        run,
        max_batch_size=4,
        batch_wait_ms=0,
        on_batch=lambda size, seconds: batches.append((size, seconds)),
        on_dequeue=lambda seconds, priority: waits.append((seconds, priority)),
    ).start()
    try:
        deadline = time.monotonic() + 10
        first = batcher.submit("a", None, "g", deadline)
        time.sleep(0.1)  # "a" is running alone (blocked on the gate); these three queue up
        rest = [batcher.submit(x, None, "g", deadline) for x in "bcd"]
        time.sleep(0.1)
        gate.set()
        assert [f.result(5) for f in [first, *rest]] == list("abcd")
    finally:
        batcher.stop()
    assert [size for size, _ in batches] == [1, 3]
    assert all(seconds >= 0.05 for _, seconds in batches)
    assert [priority for _, priority in waits] == ["interactive"] * 4
    seconds = [s for s, _ in waits]
    assert seconds[0] < 0.1 and min(seconds[1:]) >= 0.15  # queued behind the first batch


def test_a_failing_hook_never_stops_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_args: float) -> None:
        raise RuntimeError("observer bug")

    batcher = Batcher(lambda items, _o: list(items), on_batch=broken, on_dequeue=broken).start()
    try:
        deadline = time.monotonic() + 5
        assert batcher.run("x", None, "g", deadline) == "x"
        assert batcher.run("y", None, "g", deadline) == "y"
    finally:
        batcher.stop()
    assert "observer hook failed" in caplog.text
