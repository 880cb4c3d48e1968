"""The inference worker (batching, bounds, deadlines, isolation) and the result cache (LRU and a
real redis-server), alone and behind the real HTTP service."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import socket
import threading
import time
from collections.abc import Sequence

import pytest
import requests
from conftest import far

from blip2_model import GenerationOptions
from captioning.batcher import DeadlineExceeded, QueueFull
from captioning.result_cache import MemoryCache, RedisCache, cache_key, cacheable
from rest_helpers import assert_success, two_red_circles

IMAGE = hashlib.sha256(b"image").digest()  # what the pipeline passes: the image's SHA-256
IMAGE2 = hashlib.sha256(b"image2").digest()

# ----------------------------------------------------------------------------- batcher alone


class Recorder:
    """A run_batch that records what it was given; items named 'bad' fail their batch."""

    def __init__(self, delay: float = 0.0, oom_above: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.oom_above = oom_above
        self.lock = threading.Lock()

    def __call__(self, items: Sequence[str], options: object) -> list[str]:
        with self.lock:
            self.batches.append(list(items))
        if self.oom_above is not None and len(items) > self.oom_above:
            raise OutOfMemoryError("CUDA out of memory (simulated by the workload)")
        if "bad" in items:
            raise ValueError("cannot caption this one")
        time.sleep(self.delay)
        return [f"{item}:{options}" for item in items]


class OutOfMemoryError(RuntimeError):
    """Same name as torch.cuda.OutOfMemoryError, which the batcher recognises by name."""


def test_same_options_share_a_batch_up_to_the_limit(make_batcher) -> None:
    run = Recorder(delay=0.2)
    b = make_batcher(run, max_batch_size=4, batch_wait_ms=100, max_queue=100)
    futures = [b.submit(f"img{i}", "opts-a", "a", far()) for i in range(6)]
    futures += [b.submit(f"other{i}", "opts-b", "b", far()) for i in range(2)]
    results = [f.result(timeout=10) for f in futures]
    assert results[0] == "img0:opts-a" and results[-1] == "other1:opts-b"
    assert max(len(batch) for batch in run.batches) == 4
    for batch in run.batches:  # never mixes options
        assert len({item.rstrip("0123456789") for item in batch}) == 1
    assert len(run.batches) <= 4  # 8 items with 2 options: batched, not one by one


def test_queue_bound_rejects_at_once(make_batcher) -> None:
    gate = threading.Event()

    def slow(items: Sequence[str], options: object) -> list[str]:
        gate.wait(10)
        return list(items)

    b = make_batcher(slow, max_batch_size=1, batch_wait_ms=0, max_queue=2)
    first = b.submit("running", None, "k", far())
    time.sleep(0.2)  # the worker picks it up and blocks
    b.submit("q1", None, "k", far())
    b.submit("q2", None, "k", far())
    started = time.monotonic()
    with pytest.raises(QueueFull):
        b.submit("q3", None, "k", far())
    assert time.monotonic() - started < 0.1
    gate.set()
    assert first.result(timeout=5) == "running"


def test_deadline_drops_work_not_started(make_batcher) -> None:
    run = Recorder(delay=0.5)
    b = make_batcher(run, max_batch_size=1, batch_wait_ms=0, max_queue=10)
    b.submit("long", None, "k", far())
    time.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        b.run("late", None, "k", time.monotonic() + 0.1)
    time.sleep(0.7)
    assert ["late"] not in run.batches  # dropped, never computed


def test_failure_only_fails_its_own_request(make_batcher) -> None:
    run = Recorder(delay=0.05)
    b = make_batcher(run, max_batch_size=8, batch_wait_ms=200, max_queue=10)
    futures = {name: b.submit(name, "o", "k", far()) for name in ("x", "bad", "y")}
    assert futures["x"].result(timeout=5) == "x:o"
    assert futures["y"].result(timeout=5) == "y:o"
    with pytest.raises(ValueError):
        futures["bad"].result(timeout=5)
    assert ["x", "bad", "y"] in run.batches and ["bad"] in run.batches


def test_out_of_memory_halves_the_batch(make_batcher) -> None:
    run = Recorder(oom_above=2)
    b = make_batcher(run, max_batch_size=8, batch_wait_ms=200, max_queue=10)
    futures = [b.submit(f"i{i}", "o", "k", far()) for i in range(8)]
    assert [f.result(timeout=5) for f in futures] == [f"i{i}:o" for i in range(8)]
    sizes = [len(batch) for batch in run.batches]
    assert sizes == [8, 4, 2, 2, 4, 2, 2]


# ----------------------------------------------------------------------------- cache keys


def test_cache_key_changes_with_image_model_and_every_option() -> None:
    base = GenerationOptions()
    key = cache_key(IMAGE, "model-a", base)
    assert key == cache_key(IMAGE, "model-a", GenerationOptions())
    assert key != cache_key(IMAGE2, "model-a", base)
    assert key != cache_key(IMAGE, "model-b", base)
    changes = {
        "num_beams": 4,
        "max_length": 20,
        "min_length": 5,
        "num_captions": 2,
        "repetition_penalty": 1.5,
        "prompt": "a dog",
    }
    assert set(changes) | {"use_nucleus_sampling", "top_p"} == {
        f.name for f in dataclasses.fields(GenerationOptions)
    }
    seen = {key}
    for name, value in changes.items():
        other = cache_key(IMAGE, "model-a", dataclasses.replace(base, **{name: value}))
        assert other not in seen, name
        seen.add(other)
    sampled = dataclasses.replace(base, use_nucleus_sampling=True)
    assert not cacheable(sampled) and cacheable(base)
    assert cache_key(IMAGE, "m", sampled) != cache_key(
        IMAGE, "m", dataclasses.replace(sampled, top_p=0.5)
    )


def test_cache_key_refuses_image_bytes() -> None:
    with pytest.raises(ValueError, match="digest"):
        cache_key(b"\x89PNG raw image bytes", "model-a", GenerationOptions())


def test_cache_key_formula_is_the_one_shared_caches_hold() -> None:
    """Replicas of different versions share a Redis cache: the key of an image must not change
    with how the pipeline hashes it (SHA-256 over the image's SHA-256, identity, options)."""
    import json

    options = GenerationOptions(num_beams=4)
    expected = hashlib.sha256(
        hashlib.sha256(b"image").digest()
        + b"model-a"
        + json.dumps(options.signature(), sort_keys=True).encode()
    ).hexdigest()
    assert cache_key(IMAGE, "model-a", options) == expected


def test_memory_cache_lru_and_ttl() -> None:
    cache = MemoryCache(max_entries=2, ttl=0.2)
    cache.set("a", ["A"])
    cache.set("b", ["B"])
    assert cache.get("a") == ["A"]  # a is now most recent
    cache.set("c", ["C"])  # evicts b
    assert cache.get("b") is None and cache.get("c") == ["C"]
    time.sleep(0.25)
    assert cache.get("a") is None  # expired


# ----------------------------------------------------------------------------- real redis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_cache_roundtrip_and_outage(redis_server: str) -> None:
    cache = RedisCache(redis_server, ttl=60)
    assert cache.get("k") is None
    cache.set("k", ["two red circles"])
    assert cache.get("k") == ["two red circles"]
    assert cache.health()["status"] == "ok" and cache.warnings() == []
    down = RedisCache(f"redis://127.0.0.1:{_free_port()}/0", ttl=60)
    started = time.monotonic()
    assert down.get("k") is None
    down.set("k", ["x"])
    assert time.monotonic() - started < 1.0
    assert down.health()["status"] == "down" and "redis" in down.warnings()[0]


# ----------------------------------------------------------------------------- through HTTP


def _post(url: str, data: bytes, **params: object) -> requests.Response:
    return requests.post(
        url + "/analyze",
        params=params,
        data=data,
        headers={"Content-Type": "image/png"},
        timeout=60,
    )


def test_http_cache_hit_and_miss(serve_app, base_settings) -> None:
    server = serve_app(base_settings)
    data = two_red_circles()
    first = assert_success(_post(server.url, data))
    assert "cached" not in first["metadata"]
    second = assert_success(_post(server.url, data))
    assert second["metadata"]["cached"] is True
    assert second["predictions"][0]["text"] == first["predictions"][0]["text"]
    other = assert_success(_post(server.url, data, num_beams=4))
    assert "cached" not in other["metadata"]
    sampled = [assert_success(_post(server.url, data, sampling="true")) for _ in range(2)]
    assert all("cached" not in s["metadata"] for s in sampled)


def test_http_shared_redis_cache_and_redis_down(serve_app, base_settings, redis_server) -> None:
    data = two_red_circles()
    a = serve_app(base_settings.with_overrides(redis_url=redis_server))
    b = serve_app(base_settings.with_overrides(redis_url=redis_server))
    assert "cached" not in assert_success(_post(a.url, data))["metadata"]
    assert assert_success(_post(b.url, data))["metadata"]["cached"] is True  # shared by replicas
    down = serve_app(base_settings.with_overrides(redis_url=f"redis://127.0.0.1:{_free_port()}/0"))
    body = assert_success(_post(down.url, data))
    assert body["predictions"][0]["text"].startswith("Two red circles")
    health = requests.get(down.url + "/health", timeout=2).json()
    assert any("redis" in w for w in health["warnings"])
    assert health["status"] == "healthy"


HEAVY = {"num_beams": 10, "min_length": 75, "max_length": 75}


def test_http_queue_full_is_503_with_retry_after(serve_app, base_settings) -> None:
    server = serve_app(base_settings.with_overrides(max_queue=1, max_batch_size=1, cache_size=0))
    data = two_red_circles()
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda _: _post(server.url, data, **HEAVY), range(8)))
    busy = [r for r in responses if r.status_code == 503]
    assert busy, [r.status_code for r in responses]
    assert all(r.headers.get("Retry-After") for r in busy)
    assert all("busy" in r.json()["error"]["message"] for r in busy)
    assert any(r.status_code == 200 for r in responses)


def test_http_deadline_is_503(serve_app, base_settings) -> None:
    server = serve_app(
        base_settings.with_overrides(request_timeout=0.3, max_batch_size=1, cache_size=0)
    )
    data = two_red_circles()
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda _: _post(server.url, data, **HEAVY), range(4)))
    late = [r for r in responses if r.status_code == 503]
    assert late
    assert all("timed out" in r.json()["error"]["message"] for r in late)


def test_http_concurrent_requests_are_batched(serve_app, base_settings) -> None:
    server = serve_app(base_settings.with_overrides(cache_size=0, batch_wait_ms=50))
    images = [two_red_circles()] * 8
    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda d: _post(server.url, d), images))
    assert all(r.status_code == 200 for r in responses)
    texts = {r.json()["predictions"][0]["text"] for r in responses}
    assert len(texts) == 1
    model = requests.get(server.url + "/health", timeout=2).json()["model"]
    assert model["images_run"] == 8 + 0 and model["batches_run"] < 8
