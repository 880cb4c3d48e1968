"""The one captioning entry point: an image source + options + deadline → captions.

    result = pipeline.caption(source, options, deadline=time.monotonic() + 60)

Every caller goes through here — the analyze and batch routes, the job worker, the folder CLI,
a Ray actor — so each gets the same order of steps and the same errors:

    readiness → read the source (bounded) → cache lookup → decode → batcher → model
              → cache store → predictions (emoji mappings)

Readiness comes first so a loading service answers 503 before it downloads anything; then an
interactive request takes its place in the batcher's queue (`Batcher.reserve`), so a request
that cannot be queued gets 503 before it waits for a decode slot, downloads or decodes, and one
that was let in is never refused later for the queue bound. The cache is keyed by the raw bytes,
so a hit skips decoding (and gives its place back). Nothing here knows about HTTP.

A caller with several images at once (a batch request) may split the call: :meth:`stage`
every image first (read, cache, decode), then :meth:`finish` them together, so they reach the
batcher at the same moment and share full model batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from captioning.admission import Reservation
from captioning.batcher import INTERACTIVE
from captioning.errors import DeadlineExceeded, too_large
from captioning.options import GenerationOptions
from captioning.predictions import predictions
from captioning.result_cache import ResultCache, cache_key, cacheable
from image_input.decode import decode_image

if TYPE_CHECKING:
    from captioner.base import CaptionModel
    from captioning.model_state import ModelState
    from emoji_config import EmojiConfigStore
    from image_input.sources import ImageSource
    from settings import Settings


@dataclass(frozen=True)
class CaptionResult:
    """Captions of one image, their prediction entries, and how they were made."""

    captions: list[str]
    predictions: list[dict[str, Any]]
    cached: bool
    image_sha256: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Staged:
    """An image read and looked up: cached captions, or the prepared model input."""

    sha256: str
    cache_key: str | None
    captions: list[str] | None = None
    prepared: Any = None
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Runs one image through readiness, input, cache, decoder, batcher, model and emoji."""

    def __init__(
        self,
        settings: Settings,
        model: ModelState,
        cache: ResultCache,
        emoji: EmojiConfigStore,
    ) -> None:
        self.max_bytes = settings.max_file_size
        self.max_pixels = settings.max_image_pixels
        self.request_timeout = settings.request_timeout
        self.model = model
        self.cache = cache
        self.emoji = emoji
        # Bounds the images in memory at once: bytes read locally plus their decoded pixels.
        self._decode_slots = threading.BoundedSemaphore(settings.decode_slots)

    def deadline(self, started: float) -> float:
        """The monotonic instant by which a request that started at `started` must finish."""
        return started + self.request_timeout

    def caption(
        self,
        source: ImageSource,
        options: GenerationOptions,
        *,
        deadline: float,
        tags: bool = False,
        priority: str = INTERACTIVE,
        reservation: Reservation | None = None,
    ) -> CaptionResult:
        """Caption one image; raises the errors of captioning/errors.py, nothing else.
        `priority`: ``interactive`` (callers waiting) or ``bulk`` (job items; served by the
        batcher only when no interactive request waits). `reservation`: the queue place the
        caller took with :meth:`admit` (else one is taken here)."""
        captioner, _ = self.model.ready()
        captioner.check_options(options)  # 400 before any download or decode
        if priority != INTERACTIVE:  # job items: bounded by the job worker, not the door
            staged = self._stage(source, captioner, options, deadline)
            return self.finish(staged, options, deadline=deadline, tags=tags, priority=priority)
        with reservation or self.admit(options) as reservation:
            staged = self._stage(source, captioner, options, deadline, reservation)
            return self.finish(
                staged, options, deadline=deadline, tags=tags, reservation=reservation
            )

    def admit(self, options: GenerationOptions, held: Reservation | None = None) -> Reservation:
        """A place in the model's queue for an interactive request, or an error now: NotReady
        (loading), QueueFull (503 + Retry-After) or InvalidOption (400). Taken before anything
        is read, so a refused request costs no download, decode slot or decode; the queue is
        checked before the options because a refusal must cost next to nothing (the GIL is
        shared with the inference thread's Python). `held`: a place already taken for this
        request on its headers (http_api/door.py), used instead of a new one."""
        captioner, batcher = self.model.ready()
        group = options.signature()
        if held is not None and held.held and held.group == group:
            reservation = held
        else:
            if held is not None:
                held.release()
            reservation = batcher.reserve(group)  # the cheap refusal first
        try:
            captioner.check_options(options)  # tokenizes the prompt: ~1 ms of Python
        except BaseException:
            reservation.release()
            raise
        return reservation

    def stage(self, source: ImageSource, options: GenerationOptions, *, deadline: float) -> Staged:
        """Everything before the model: readiness, read, cache lookup, decode."""
        captioner, _ = self.model.ready()
        captioner.check_options(options)  # 400 before any download or decode
        return self._stage(source, captioner, options, deadline)

    def finish(
        self,
        staged: Staged,
        options: GenerationOptions,
        *,
        deadline: float,
        tags: bool = False,
        priority: str = INTERACTIVE,
        reservation: Reservation | None = None,
    ) -> CaptionResult:
        """The model (unless the cache answered), cache store and predictions of a staged image.
        `reservation`: the queue place taken at the door (see :meth:`caption`)."""
        _, batcher = self.model.ready()
        captions = staged.captions
        if captions is None:
            started = time.monotonic()
            try:
                captions = batcher.run(
                    staged.prepared, options, options.signature(), deadline, priority, reservation
                )
            except DeadlineExceeded:
                raise DeadlineExceeded(
                    f"Request timed out after {self.request_timeout:g} s waiting for the model"
                ) from None
            staged.timings["model"] = time.monotonic() - started
            if staged.cache_key is not None:
                self.cache.set(staged.cache_key, captions)
        return CaptionResult(
            captions=captions,
            predictions=predictions(captions, self.emoji.mapper, tags=tags),
            cached=staged.captions is not None,
            image_sha256=staged.sha256,
            timings=staged.timings,
        )

    def _stage(
        self,
        source: ImageSource,
        captioner: CaptionModel,
        options: GenerationOptions,
        deadline: float,
        reservation: Reservation | None = None,
    ) -> Staged:
        """Read (downloads outside the decode slot, local bytes inside it), look up, decode."""
        started = time.monotonic()
        downloaded = None if source.local else source.read()
        if reservation is not None:
            reservation.arriving()  # bytes in hand: the batcher may wait a moment for it
        with self._decode_slot(deadline):
            data = downloaded if downloaded is not None else source.read()
            del downloaded
            if len(data) > self.max_bytes:
                raise too_large(self.max_bytes)
            read_done = time.monotonic()
            digest = hashlib.sha256(data).digest()  # once: the log's image id and the cache's
            key = cache_key(digest, captioner.identity, options) if cacheable(options) else None
            staged = Staged(digest.hex(), key)
            staged.timings["read"] = read_done - started
            staged.captions = self.cache.get(key) if key is not None else None
            if staged.captions is None:
                image = decode_image(
                    data, max_pixels=self.max_pixels, error_prefix=source.error_prefix
                )
                del data
                staged.prepared = captioner.prepare(image)  # ~1.8 MB queued, not the image
                staged.timings["decode"] = time.monotonic() - read_done
            return staged

    @contextlib.contextmanager
    def _decode_slot(self, deadline: float) -> Iterator[None]:
        if not self._decode_slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded("Request timed out waiting to decode the image")
        try:
            yield
        finally:
            self._decode_slots.release()
