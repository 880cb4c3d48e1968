"""The captioning pipeline behind the HTTP edge: readiness, cache, batcher, model.

Data flows one way: image bytes → result cache → batcher → model → captions. `REST.py` turns
requests into calls here and results into envelopes; this module knows nothing about HTTP.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from batcher import Batcher
from blip2_model import Captioner, GenerationOptions
from result_cache import ResultCache, cache_key, cacheable
from settings import Settings

log = logging.getLogger(__name__)

LOADING, READY, ERROR = "loading", "loaded", "error"


class NotReady(Exception):
    """The model is still loading or failed to load (HTTP 503)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class CaptionService:
    """Owns the model's lifecycle and the single inference worker around it."""

    def __init__(self, settings: Settings, cache: ResultCache) -> None:
        self.settings = settings
        self.cache = cache
        self.status = LOADING
        self.reason = "model is loading"
        self.captioner: Captioner | None = None
        self.batcher: Batcher[Any, list[str]] | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def set_ready(self, captioner: Captioner) -> None:
        batcher: Batcher[Any, list[str]] = Batcher(
            self._run_batch,
            max_batch_size=self.settings.max_batch_size,
            batch_wait_ms=self.settings.batch_wait_ms,
            max_queue=self.settings.max_queue,
        ).start()
        with self._lock:
            self.captioner = captioner
            self.batcher = batcher
            self.status, self.reason = READY, ""
        log.info("model %s ready on %s", captioner.name, captioner.device)

    def set_failed(self, reason: str) -> None:
        with self._lock:
            self.status, self.reason = ERROR, reason
        log.error("model failed to load: %s", reason)

    def load_in_background(self, load: Callable[[], Captioner]) -> threading.Thread:
        """Load (and warm up) the model off the serving thread so the port opens at once."""

        def target() -> None:
            try:
                captioner = load()
                captioner.warmup()
            except Exception as exc:  # any failure becomes a 503 with the reason in /health
                self.set_failed(str(exc) or type(exc).__name__)
                return
            self.set_ready(captioner)

        thread = threading.Thread(target=target, name="model-loader", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self.cache.close()

    # -- work ----------------------------------------------------------------------------

    def _run_batch(self, images: Sequence[Any], options: GenerationOptions) -> list[list[str]]:
        assert self.captioner is not None
        return self.captioner.caption(images, options)

    def ready(self) -> tuple[Captioner, Batcher[Any, list[str]]]:
        if self.status != READY or self.captioner is None or self.batcher is None:
            raise NotReady(self.status, self.reason)
        return self.captioner, self.batcher

    def lookup(
        self, image_bytes: bytes, options: GenerationOptions
    ) -> tuple[str | None, list[str] | None]:
        """The cache key (None when uncacheable) and a cached result, if any."""
        captioner, _ = self.ready()
        if not cacheable(options):
            return None, None
        key = cache_key(image_bytes, captioner.identity, options)
        return key, self.cache.get(key)

    def caption(
        self, image: Any, options: GenerationOptions, key: str | None, deadline: float
    ) -> list[str]:
        """Queue one decoded image and wait for its captions (until `deadline`, monotonic)."""
        _, batcher = self.ready()
        captions = batcher.run(image, options, options.key(), deadline)
        if key is not None:
            self.cache.set(key, captions)
        return captions

    def deadline(self, started: float) -> float:
        return started + self.settings.request_timeout

    def health(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.status}
        if self.captioner is not None:
            info.update(
                name=self.captioner.name,
                device=self.captioner.device,
                precision=self.captioner.precision,
            )
        if self.batcher is not None:
            info.update(
                queue_depth=self.batcher.depth,
                max_queue=self.batcher.max_queue,
                max_batch_size=self.batcher.max_batch_size,
                batches_run=self.batcher.batches_run,
                images_run=self.batcher.items_run,
            )
        return info
