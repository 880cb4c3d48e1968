"""Caption results cached by image content, model identity and every generation option.

In-process LRU by default (`CACHE_SIZE` entries, `CACHE_TTL` seconds); Redis when `REDIS_URL` is
set, so replicas share hits. A cache is an optimisation only: when Redis is down the service keeps
answering (uncached) and says so in `/health` warnings. Sampled captions are never cached (the
caller asked for randomness).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

from captioning.options import GenerationOptions

log = logging.getLogger(__name__)

KEY_PREFIX = "blip2:caption:v1:"
REDIS_TIMEOUT_S = 0.25
REDIS_RETRY_AFTER_S = 5.0


def cache_key(image_digest: bytes, model_identity: str, options: GenerationOptions) -> str:
    """SHA-256 over the image's SHA-256 (`image_digest`, the 32 raw bytes the pipeline computes
    once per image), the model identity and every option that shapes output."""
    if len(image_digest) != hashlib.sha256().digest_size:
        raise ValueError("cache_key takes the image's SHA-256 digest, not the image bytes")
    digest = hashlib.sha256()
    digest.update(image_digest)
    digest.update(model_identity.encode("utf-8"))
    digest.update(json.dumps(options.signature(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def cacheable(options: GenerationOptions) -> bool:
    return not options.use_nucleus_sampling


class ResultCache(Protocol):
    def get(self, key: str) -> list[str] | None: ...
    def set(self, key: str, value: list[str]) -> None: ...
    def health(self) -> dict[str, Any]: ...
    def warnings(self) -> list[str]: ...
    def close(self) -> None: ...


class NullCache:
    """Caching switched off (CACHE_SIZE=0 and no REDIS_URL)."""

    def get(self, key: str) -> list[str] | None:
        return None

    def set(self, key: str, value: list[str]) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {"backend": "none"}

    def warnings(self) -> list[str]:
        return []

    def close(self) -> None:
        return None


class MemoryCache:
    """Thread-safe LRU with a time-to-live; bounded by entry count."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._data: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> list[str] | None:
        now = time.monotonic()
        with self._lock:
            entry = self._data.get(key)
            if entry is None or (self.ttl > 0 and now - entry[0] > self.ttl):
                if entry is not None:
                    del self._data[key]
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return list(entry[1])

    def set(self, key: str, value: list[str]) -> None:
        with self._lock:
            self._data[key] = (time.monotonic(), list(value))
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def health(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "entries": len(self._data),
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
        }

    def warnings(self) -> list[str]:
        return []

    def close(self) -> None:
        return None


class RedisCache:
    """Redis-backed cache with short timeouts; an outage turns it into a miss, never an error."""

    def __init__(self, url: str, ttl: float) -> None:
        import redis

        self.url = url
        self.ttl = ttl
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        self._down_until = 0.0
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._last_error is None:
                log.warning("redis unavailable (%s); serving without cache", exc)
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._down_until = time.monotonic() + REDIS_RETRY_AFTER_S

    def _ok(self) -> None:
        if self._last_error is not None:
            log.info("redis is back")
        self._last_error = None

    def get(self, key: str) -> list[str] | None:
        if not self._available():
            return None
        try:
            raw = self._client.get(KEY_PREFIX + key)
        except Exception as exc:  # redis.RedisError, OSError
            self._failed(exc)
            return None
        self._ok()
        if raw is None:
            self.misses += 1
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None
        self.hits += 1
        return value

    def set(self, key: str, value: list[str]) -> None:
        if not self._available():
            return
        try:
            ex = int(self.ttl) if self.ttl >= 1 else None
            self._client.set(KEY_PREFIX + key, json.dumps(value), ex=ex)
        except Exception as exc:
            self._failed(exc)
            return
        self._ok()

    def health(self) -> dict[str, Any]:
        return {
            "backend": "redis",
            "status": "down" if self._last_error else "ok",
            "hits": self.hits,
            "misses": self.misses,
        }

    def warnings(self) -> list[str]:
        if self._last_error:
            return [f"result cache (redis) unavailable, serving uncached: {self._last_error}"]
        return []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def make_cache(redis_url: str | None, cache_size: int, cache_ttl: float) -> ResultCache:
    if redis_url:
        return RedisCache(redis_url, cache_ttl)
    if cache_size > 0:
        return MemoryCache(cache_size, cache_ttl)
    return NullCache()
