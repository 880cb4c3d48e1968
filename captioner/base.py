"""What every loaded model family shares: the interface the service calls, and its common half.

The pipeline, batcher, result cache, jobs, CLI and Ray call a captioner through `CaptionModel`
and nothing else, so a family (BLIP v1 in blip_captioner.py, BLIP-2 in blip2_captioner.py) is
added without touching them. `CaptionerBase` holds what does not depend on the family: the
precision and device it was cast to, preprocessing on request threads (Pillow and NumPy, no torch
parallel region), batching a list of images, warm-up, the start-up thread choice and what /health
says about the model. A family supplies `check_options`, `caption_prepared` and `stamp_identity`.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from captioner.spec import ModelError
from captioning.options import GenerationOptions

if TYPE_CHECKING:
    import torch
    from PIL import Image

DECODERS = ("fast", "stock")

#: Distinct prompt texts whose tokens a captioner keeps (the `prompt` option is the caller's
#: text, so the memo is bounded; the default prompt is the one nearly every request uses).
PROMPT_MEMO = 256


class CaptionModel(Protocol):
    """A loaded captioning model, owned by one thread (the batcher's worker)."""

    arch: str
    device: str
    precision: str
    decode: str
    parameters: int
    spec: Any
    model: Any

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    def prepare(self, image: Image.Image) -> torch.Tensor: ...

    def check_options(self, options: GenerationOptions) -> GenerationOptions: ...

    def caption(
        self, images: Sequence[Image.Image], options: GenerationOptions | None = None
    ) -> list[list[str]]: ...

    def caption_prepared(
        self, prepared: Sequence[torch.Tensor], options: GenerationOptions | None = None
    ) -> list[list[str]]: ...

    def warmup(self) -> None: ...

    def choose_threads(self, batch: int = 1) -> int: ...

    def threads(self) -> int: ...

    def set_threads(self, threads: int) -> None: ...


class CaptionerBase(ABC):
    """The family-independent half of a captioner: cast, prepare, batch, warm up, describe."""

    arch = "unknown"

    def __init__(
        self,
        model: Any,
        spec: Any,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        decode: str = "fast",
    ) -> None:
        import torch

        if decode not in DECODERS:
            raise ModelError(f"DECODE must be one of {', '.join(DECODERS)}, got {decode!r}")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        # Low precision: convert the weights once (autocast alone would re-cast them per call).
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.spec = spec
        self.device = device
        self.precision = precision
        self.decode = decode
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self._torch = torch

    @property
    def name(self) -> str:
        return str(self.spec.name)

    @functools.cached_property
    def identity(self) -> str:
        """Part of the result-cache key: which weights, precision and decoder made a caption.

        Stamped once, on first use, not per request: that was two stat calls (more for
        BLIP-2's LM shards) on every request's path, and the weights in memory do not change."""
        return self.stamp_identity()

    @abstractmethod
    def stamp_identity(self) -> str:
        """The identity from the spec and the weight files on disk (size and mtime)."""

    @abstractmethod
    def check_options(self, options: GenerationOptions) -> GenerationOptions:
        """Validate options for this model (what each one means differs by family)."""

    @abstractmethod
    def caption_prepared(
        self, prepared: Sequence[torch.Tensor], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """`caption` for images already through :meth:`prepare` (what the batcher queues)."""

    def describe(self) -> dict[str, Any]:
        """What /health (inside `model`), /metrics and the page say about the loaded model."""
        return {
            "name": self.name,
            "arch": self.arch,
            "precision": self.precision,
            "decode": self.decode,
            "parameters": self.parameters,
        }

    # -- inference ---------------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image as the model's input: square resize (bicubic), to tensor, CLIP-normalise.
        Thread-safe and free of torch parallel regions (see `image_prep.prepare_pixels`), so
        request threads prepare in parallel and queue small tensors, not images."""
        from image_prep import prepare_pixels

        return prepare_pixels(image, self.spec)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._torch.stack([self.prepare(img) for img in images])

    def caption(
        self, images: Sequence[Image.Image], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """Caption every image in one batch; `num_captions` captions per image, in order."""
        return self.caption_prepared([self.prepare(img) for img in images], options)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return self._torch.autocast(self.device.split(":")[0], dtype=self.dtype)

    def warmup(self) -> None:
        """One caption on a blank image so the first request does not pay for lazy init."""
        from PIL import Image

        self.caption([Image.new("RGB", (self.spec.image_size,) * 2, (127, 127, 127))])

    def choose_threads(self, batch: int = 1) -> int:
        """All cores or one, whichever captions faster (see cpu_threads.choose_threads)."""
        from cpu_threads import choose_threads

        return choose_threads(self, batch)

    def threads(self) -> int:
        """Threads the model's CPU ops use when called from this thread (the setting is per
        OpenMP thread: ask on the thread that runs the model)."""
        return int(self._torch.get_num_threads())

    def set_threads(self, threads: int) -> None:
        """Run the model's CPU ops on `threads` threads when called from this thread."""
        self._torch.set_num_threads(threads)
