"""The one owner of every thread, pool and client the service runs.

    runtime = Runtime(settings).start()      # returns at once; the model loads in the background
    ...
    runtime.stop(drain_timeout=30)           # finish queued work, then stop everything

Start order (one thread, "model-loader"): OpenMP wait policy (before torch loads) → emoji config
(bounded by TIMEOUT; falls back to the cache or the bundled default) → emoji refresh thread → job
store and spool (jobs can be submitted while the model loads) → the batcher's thread, which loads
and warms up the model itself before serving (with libgomp every thread that runs torch owns an
OpenMP team; one thread for load, warm-up and inference keeps one team in the process; on a CPU
with TORCH_THREADS unset it also sets the team's size before each batch,
`load_follower.LoadFollower`)
→ job worker and job upkeep thread.
Stop order is the reverse: job worker (claims nothing more, finishes and records the items it
holds, releases the rest) and upkeep → batcher (drained) → emoji refresh → URL fetcher's DNS
pool → result cache.
Nothing else in the code base starts a thread that outlives a call (waitress owns its own
request threads; REST.py owns waitress).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from bulk.service import BulkService
from captioning.batcher import Batcher
from captioning.metrics import ServiceMetrics
from captioning.model_state import ModelState
from captioning.pipeline import Pipeline
from captioning.result_cache import ResultCache, make_cache
from emoji_config import EmojiConfigStore
from image_input.sources import ImageReader
from load_follower import LoadFollower, follows_load, with_follower
from openmp_policy import apply_openmp_policy

if TYPE_CHECKING:
    from captioner.base import CaptionModel
    from captioner.device import DevicePlan
    from settings import Settings

log = logging.getLogger(__name__)


class Runtime:
    """Builds the service's parts from one Settings object and runs their lifecycles."""

    def __init__(
        self,
        settings: Settings,
        *,
        captioner: CaptionModel | None = None,
        emoji_store: EmojiConfigStore | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        """`captioner`: an already loaded model (tests, tools); otherwise the configured one is
        loaded by :meth:`start`."""
        self.settings = settings
        self.cache = cache or make_cache(
            settings.redis_url, settings.cache_size, settings.cache_ttl
        )
        self.emoji = emoji_store or EmojiConfigStore(settings)
        self.images = ImageReader(settings)
        self.model = ModelState()
        self.metrics = ServiceMetrics(self)  # its own registry; states are read at scrape time
        self.pipeline = Pipeline(settings, self.model, self.cache, self.emoji)
        self.bulk = BulkService(settings, self.pipeline, self.images)  # /v3/batch, /v3/jobs
        # Captioning requests inside the service at once (THREADS - 4): the rest is shed with
        # 503 at the door, so the threads kept for /health and /metrics are never taken.
        self.analyze_slots = threading.BoundedSemaphore(settings.analyze_slots)
        self.draining = False
        self.device_plan: DevicePlan | None = None
        self._given_captioner = captioner
        self._loader: threading.Thread | None = None
        self._batcher: Batcher[Any, list[str]] | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, *, wait: bool = False) -> Runtime:
        """Load the emoji config and the model, then start the batcher. In the background
        unless `wait` (tests and tools that want a ready runtime when this returns)."""
        apply_openmp_policy(self.settings)  # before anything in this process imports torch
        if wait:
            self._load()
        else:
            self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._loader.start()
        return self

    def _load(self) -> None:
        self.emoji.load()
        self.emoji.start_refresh()
        self.bulk.open()
        started = time.monotonic()
        loaded: list[CaptionModel] = []
        threads: list[int | LoadFollower] = []

        def load_on_worker() -> Any:  # runs on the batcher's own thread
            captioner = self._given_captioner or self._load_captioner()
            loaded.append(captioner)
            pinned = bool(self.settings.torch_threads)
            if not follows_load(captioner.device, pinned):
                threads.append(captioner.threads())  # the worker's own setting, kept
                return captioner.caption_prepared
            follower = LoadFollower(captioner.threads(), captioner.set_threads)
            threads.append(follower)
            return with_follower(captioner.caption_prepared, follower)

        batcher: Batcher[Any, list[str]] = Batcher(
            None,
            max_batch_size=self.settings.max_batch_size,
            batch_wait_ms=self.settings.batch_wait_ms,
            max_queue=self.settings.max_queue,
            on_batch=self.metrics.observe_batch,
            on_dequeue=self.metrics.observe_queue_wait,
        )
        self._batcher = batcher
        try:
            batcher.start(setup=load_on_worker).wait_setup()
        except Exception as exc:  # any failure becomes a 503 with the reason in /health
            batcher.stop()
            self.model.set_failed(str(exc) or type(exc).__name__)
            return
        if self._stopped:
            batcher.stop()
            return
        self.model.set_ready(loaded[0], batcher, time.monotonic() - started, threads[0])
        if not self._stopped:
            self.bulk.start()

    def _load_captioner(self) -> CaptionModel:
        from blip2_model import Captioner
        from captioner.device import plan_device

        # The plan logs one clear error when a visible GPU cannot be used (see /health too).
        self.device_plan = plan_device(self.settings.device, self.settings.precision)
        captioner = Captioner.load(self.settings, plan=self.device_plan)
        captioner.warmup()  # the first request should not pay for lazy initialisation
        if not self.settings.torch_threads:
            # one core or all: whichever this model runs a full batch faster
            captioner.choose_threads(self.settings.max_batch_size)
        return captioner

    def begin_drain(self) -> None:
        """Say `draining` in /health so load balancers stop sending; work goes on."""
        if not self.draining:
            log.info("draining: finishing accepted work")
        self.draining = True
        self.bulk.begin_drain()

    def stop(self, drain_timeout: float = 0.0) -> bool:
        """Finish queued model work (up to `drain_timeout` s), then stop every part in reverse
        start order. Returns True when nothing queued was lost."""
        self.begin_drain()
        self._stopped = True
        until = time.monotonic() + drain_timeout
        drained = self.bulk.stop(drain_timeout)
        batcher = self.model.batcher or self._batcher
        if batcher is not None:
            drained = batcher.drain(max(0.0, until - time.monotonic())) and drained
        self.emoji.close()
        self.images.close()
        self.cache.close()
        return drained

    # -- reports -----------------------------------------------------------------------------

    def warnings(self) -> list[str]:
        found = list(self.cache.warnings())
        if self.device_plan is not None:
            found += self.device_plan.warnings
        if self.model.state == "error":
            found.insert(0, f"model failed to load: {self.model.reason}")
        return found
