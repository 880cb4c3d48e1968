"""The one captioning entry point: an image source + options + deadline → captions.

    result = pipeline.caption(source, options, deadline=time.monotonic() + 60)

Every caller goes through here — the analyze and batch routes, the job worker, the folder CLI,
a Ray actor — so each gets the same order of steps and the same errors:

    readiness → read the source (bounded) → cache lookup → decode → batcher → model
              → cache store → predictions (emoji mappings)

Readiness comes first so a loading service answers 503 before it downloads anything; the cache
is keyed by the raw bytes, so a hit skips decoding. Nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from captioning.errors import DeadlineExceeded, too_large
from captioning.options import GenerationOptions
from captioning.predictions import predictions
from captioning.result_cache import ResultCache, cache_key, cacheable
from image_input.decode import decode_image

if TYPE_CHECKING:
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

    def deadline(self, started: float) -> float:
        """The monotonic instant by which a request that started at `started` must finish."""
        return started + self.request_timeout

    def caption(
        self, source: ImageSource, options: GenerationOptions, *, deadline: float
    ) -> CaptionResult:
        """Caption one image; raises the errors of captioning/errors.py, nothing else."""
        captioner, batcher = self.model.ready()
        t0 = time.monotonic()
        data = source.read()
        if len(data) > self.max_bytes:
            raise too_large(self.max_bytes)
        t1 = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        key = cache_key(data, captioner.identity, options) if cacheable(options) else None
        captions = self.cache.get(key) if key is not None else None
        cached = captions is not None
        t2 = t1
        if captions is None:
            image = decode_image(data, max_pixels=self.max_pixels, error_prefix=source.error_prefix)
            del data  # the decoded image is all the model needs; free the bytes early
            t2 = time.monotonic()
            try:
                captions = batcher.run(image, options, options.signature(), deadline)
            except DeadlineExceeded:
                raise DeadlineExceeded(
                    f"Request timed out after {self.request_timeout:g} s waiting for the model"
                ) from None
            if key is not None:
                self.cache.set(key, captions)
        t3 = time.monotonic()
        return CaptionResult(
            captions=captions,
            predictions=predictions(captions, self.emoji.mapper),
            cached=cached,
            image_sha256=digest,
            timings={"read": t1 - t0, "decode": t2 - t1, "model": t3 - t2},
        )
