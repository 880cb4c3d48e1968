"""The model's lifecycle word and, once it is loaded, the captioner and the batcher in front of it.

`state` is `loading` until the runtime hands over a warmed-up captioner, then `loaded`; a load
that fails leaves `error` with the reason. Readers that need the model call :meth:`ready`, which
either gives them both parts or raises `NotReady` — one check, one place.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from captioning.errors import NotReady
from load_follower import LoadFollower

if TYPE_CHECKING:
    from captioner.base import CaptionModel
    from captioning.batcher import Batcher

log = logging.getLogger(__name__)

LOADING, LOADED, FAILED = "loading", "loaded", "error"
_MESSAGES = {LOADING: "Model is loading", FAILED: "Model failed to load"}


class ModelState:
    """Thread-safe holder of the model's state (`loading`, `loaded`, `error`)."""

    def __init__(self) -> None:
        self.state = LOADING
        self.reason = "model is loading"
        self.captioner: CaptionModel | None = None
        self.batcher: Batcher[Any, list[str]] | None = None
        self.load_seconds: float | None = None
        self._threads: int | LoadFollower | None = None
        self._lock = threading.Lock()

    def set_ready(
        self,
        captioner: CaptionModel,
        batcher: Batcher[Any, list[str]],
        load_seconds: float = 0.0,
        threads: int | LoadFollower | None = None,
    ) -> None:
        """`threads`: the worker's fixed count, or the follower that sets it per batch."""
        with self._lock:
            self.captioner, self.batcher = captioner, batcher
            self.state, self.reason = LOADED, ""
            self.load_seconds, self._threads = load_seconds, threads
        log.info("model %s ready on %s", captioner.name, captioner.device)

    @property
    def threads(self) -> int | None:
        """Threads the model's ops run on now (TORCH_THREADS, or the start-up choice as the
        load of the moment adjusts it); None until loaded."""
        threads = self._threads
        return threads.threads if isinstance(threads, LoadFollower) else threads

    @property
    def thread_batches(self) -> dict[int, int]:
        """Batches run, by their thread count, where it is chosen per batch; else empty."""
        threads = self._threads
        return dict(threads.batches) if isinstance(threads, LoadFollower) else {}

    def set_failed(self, reason: str) -> None:
        with self._lock:
            self.state, self.reason = FAILED, reason
        log.error("model failed to load: %s", reason)

    def ready(self) -> tuple[CaptionModel, Batcher[Any, list[str]]]:
        """The captioner and its batcher, or NotReady (503) while loading or after a failure."""
        with self._lock:
            captioner, batcher, state = self.captioner, self.batcher, self.state
        if state != LOADED or captioner is None or batcher is None:
            raise NotReady(state, _MESSAGES.get(state, "Model is not ready"), self.reason)
        return captioner, batcher

    def health(self) -> dict[str, Any]:
        info: dict[str, Any] = {"status": self.state}
        if self.captioner is not None:
            info.update(self.captioner.describe(), device=self.captioner.device)
        if self.batcher is not None:
            info.update(
                queue_depth=self.batcher.depth,
                max_queue=self.batcher.max_queue,
                max_batch_size=self.batcher.max_batch_size,
                batches_run=self.batcher.batches_run,
                images_run=self.batcher.items_run,
            )
        return info
