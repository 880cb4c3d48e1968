"""The folder CLI's in-process engine: the service's own runtime and pipeline, without a server.

Each input goes through ``Pipeline.caption`` exactly like an HTTP request (same reader limits,
cache, decoder, batcher, model and predictions), from a bounded pool of threads: enough images
wait in the batcher's queue to fill the next batch while the model runs the current one
(``2 x MAX_BATCH_SIZE`` in flight), and no more are read into memory than that.

Resuming happens here too: a file the output already holds is read and hashed first, and only
captioned when its bytes changed (the bytes read are then handed to the pipeline, not read
again); a URL the output holds is skipped without downloading it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

from bulk.cli_progress import EngineError, Outcome
from captioning.errors import ServiceError
from image_input.sources import ImageSource

if TYPE_CHECKING:
    from bulk.cli_inputs import Input
    from captioning.options import GenerationOptions
    from captioning.runtime import Runtime
    from settings import Settings

log = logging.getLogger(__name__)


class ModelUnavailable(EngineError):
    """The model could not be loaded; the message says why."""


def in_flight(settings: Settings) -> int:
    """Images in the pipeline at once: two batches (one running, one filling)."""
    return 2 * settings.max_batch_size


def local_settings(settings: Settings) -> Settings:
    """The batcher's queue must hold every image in flight, or the CLI would overload itself."""
    return settings.with_overrides(max_queue=max(settings.max_queue, in_flight(settings)))


class LocalRunner:
    """Captions inputs with a :class:`~captioning.runtime.Runtime` in this process."""

    def __init__(self, settings: Settings, options: GenerationOptions, *, tags: bool) -> None:
        self.settings = local_settings(settings)
        self.options = options
        self.tags = tags
        self.runtime: Runtime | None = None

    def start(self) -> None:
        """Load the emoji config and the model (blocking); ModelUnavailable when it fails,
        InvalidOption when the options do not suit this model."""
        from captioning.runtime import Runtime

        runtime = Runtime(self.settings).start(wait=True)
        self.runtime = runtime
        if runtime.model.state != "loaded":
            raise ModelUnavailable(f"model could not be loaded: {runtime.model.reason}")
        captioner, _ = runtime.model.ready()
        captioner.check_options(self.options)  # once, not as an error per image

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop(drain_timeout=0.0)
            self.runtime = None

    def outcomes(self, inputs: Iterable[Input], done: dict[str, str]) -> Iterator[Outcome]:
        """One outcome per input, as they finish; closing the iterator cancels the rest."""
        limit = in_flight(self.settings)
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="caption")
        pending: set[Future[Outcome]] = set()
        try:
            for item in inputs:
                if item.kind == "url" and item.name in done:
                    yield Outcome(item, "skipped", done[item.name])
                    continue
                while len(pending) >= limit:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in finished)
                pending.add(pool.submit(self._caption_one, item, done.get(item.name)))
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _caption_one(self, item: Input, known_sha256: str | None) -> Outcome:
        assert self.runtime is not None, "start() first"
        images = self.runtime.images
        source = images.file(item.name) if item.kind == "file" else images.url(item.name)
        try:
            if known_sha256 is not None:
                data = source.read()
                sha256 = hashlib.sha256(data).hexdigest()
                if sha256 == known_sha256:
                    return Outcome(item, "skipped", sha256)
                source = ImageSource(source.kind, source.name, lambda: data)
            deadline = time.monotonic() + self.settings.request_timeout
            result = self.runtime.pipeline.caption(
                source, self.options, deadline=deadline, tags=self.tags
            )
        except ServiceError as exc:
            return Outcome(item, "failed", error=exc.message)
        except Exception as exc:  # a bug or an unforeseen library error: report, go on
            log.debug("captioning %s failed", item.name, exc_info=True)
            return Outcome(item, "failed", error=f"{type(exc).__name__}: {exc}")
        return Outcome(item, "captioned", result.image_sha256, result.predictions)
