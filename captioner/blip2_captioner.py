"""A loaded BLIP-2 model behind the same interface as `blip2_model.Captioner`.

The service's pipeline, batcher, cache, jobs, CLI and Ray call `prepare`, `caption_prepared`,
`check_options`, `stamp_identity`, `name`, `warmup` (see docs/models.md for how Captioner.load
dispatches here by arch). What differs from BLIP v1 is what the options mean for this family,
and that is decided here, once:

- `prompt` continues the model's own prompt ("a photo of"): 1.0.2 takes one prompt string for
  the whole batch, so a batch never mixes prompts (the batcher batches by options already). As
  with BLIP v1 in this service, the caption starts with the caller's prompt.
- `max_length` counts new tokens (LAVIS passes it as max_new_tokens); `min_length` counts the
  prompt's tokens too (BOS included, the 32 query tokens not), as stock Hugging Face does.
- `num_captions` <= `num_beams` unless sampling.
- A caption that comes out empty (the model ended at once) is decoded again for that image with
  the end token barred from the first new position, so the service never answers "".
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.base import PROMPT_MEMO, CaptionerBase
from captioner.blip2_spec import Blip2Spec
from captioner.spec import ModelError
from captioning.errors import InvalidOption
from captioning.options import GenerationOptions

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_blip2(spec: Blip2Spec, *, device: str = "cpu", precision: str = "fp32") -> Any:
    """Assemble the model from its local files, fill and check every weight, cast it."""
    import torch

    from captioner.blip2_build import build_blip2, count_parameters, load_weights, to_precision

    missing = spec.missing_files()
    if missing:
        raise ModelError(f"{spec.name}: files missing: {', '.join(str(p) for p in missing)}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    started = time.monotonic()
    model = build_blip2(spec)
    counts = load_weights(model, spec, lm_dtype=dtype)
    model = to_precision(model, device, dtype)
    log.info(
        "loaded %s (%.1fM parameters; weights from %s) on %s in %s in %.1fs",
        spec.name,
        count_parameters(model) / 1e6,
        counts,
        device,
        precision,
        time.monotonic() - started,
    )
    return model


class Blip2Captioner(CaptionerBase):
    """A loaded BLIP-2 model that captions a list of images in one batch (one thread owns it)."""

    def __init__(
        self,
        model: Any,
        spec: Blip2Spec,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        decode: str = "fast",
    ) -> None:
        import torch

        if spec.arch != "blip2_opt" and decode == "fast":
            decode = "stock"  # Blip2T5's stock generate already encodes each image once
        super().__init__(model, spec, device=device, precision=precision, decode=decode)
        self.arch = spec.arch
        # Options are checked per request against the prompt's length (see BlipCaptioner).
        self._opt_prompt_len = functools.lru_cache(maxsize=PROMPT_MEMO)(self._count_opt_tokens)
        # LAVIS's fp16-safe LayerNorm computes in fp32 and needs fp32 weights (as on GPU).
        self.model.ln_vision.float()
        if spec.arch == "blip2_t5" and self.dtype != torch.float32:
            # Blip2T5.generate hands the Q-Former fp32 image features (LAVIS keeps the Q-Former
            # fp32 and autocasts on GPU); so does this, under autocast (see `_autocast`).
            self.model.Qformer.float()
            self.model.query_tokens.data = self.model.query_tokens.data.float()

    @classmethod
    def load(
        cls, spec: Blip2Spec, *, device: str = "cpu", precision: str = "fp32", decode: str = "fast"
    ) -> Blip2Captioner:
        model = load_blip2(spec, device=device, precision=precision)
        return cls(model, spec, device=device, precision=precision, decode=decode)

    # -- identity ----------------------------------------------------------------------------

    def stamp_identity(self) -> str:
        """Part of the result-cache key: which weights, precision and decoder made a caption."""
        from captioner.blip2_build import lm_weight_files

        files: list[Path] = [p for p in [self.spec.checkpoint] if p is not None]
        files += lm_weight_files(self.spec.lm_dir)
        stamps = [f"{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files if p.is_file()]
        decoder = "" if self.precision == "fp32" else f"|{self.decode}"
        return f"{self.spec.name}|{','.join(stamps)}|{self.precision}{decoder}"

    # -- options -----------------------------------------------------------------------------

    def prompt_text(self, opts: GenerationOptions) -> str:
        extra = opts.prompt.strip()
        return f"{self.spec.prompt} {extra}".strip() if extra else self.spec.prompt

    def prompt_length(self, prompt: str) -> int:
        """Tokens of the language-model prompt as min_length counts them (BOS included)."""
        if self.spec.arch == "blip2_opt":
            return self._opt_prompt_len(prompt)
        return 1  # T5: min_length counts decoder tokens, which start with the start token

    def _count_opt_tokens(self, prompt: str) -> int:
        return len(self.model.opt_tokenizer(prompt).input_ids)

    def check_options(self, options: GenerationOptions) -> GenerationOptions:
        """Validate options for this model: min_length counts the prompt, so it must be
        reachable within the prompt plus max_length new tokens, and everything must fit the
        language model's positions."""
        opts = options.validate()
        prompt_len = self.prompt_length(self.prompt_text(opts))
        if opts.min_length > prompt_len + opts.max_length:
            raise InvalidOption(
                "min_length",
                f"min_length counts the {prompt_len} prompt tokens for {self.name}: at most "
                f"{prompt_len + opts.max_length} with max_length={opts.max_length} new tokens",
            )
        positions = getattr(self.language_model.config, "max_position_embeddings", None)
        used = self.spec.num_query_token + prompt_len + opts.max_length
        if self.spec.arch == "blip2_opt" and positions is not None and used > positions:
            raise InvalidOption(
                "max_length",
                f"{self.name} reads at most {positions} tokens: {self.spec.num_query_token} "
                f"image queries + {prompt_len} prompt + max_length must fit",
            )
        return opts

    @property
    def language_model(self) -> Any:
        return self.model.language_model

    # -- inference ---------------------------------------------------------------------------

    def caption_prepared(
        self, prepared: Sequence[torch.Tensor], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """`num_captions` captions per image, images in order, one batch for all of them."""
        opts = self.check_options(options or GenerationOptions())
        if not prepared:
            return []
        pixels = self._torch.stack(list(prepared)).to(device=self.device, dtype=self.dtype)
        prompt = self.prompt_text(opts)
        with self._torch.inference_mode():
            texts = self._generate(pixels, prompt, self._kwargs(opts, opts.min_length))
            n = opts.num_captions
            grouped = [texts[i * n : (i + 1) * n] for i in range(len(prepared))]
            empty = [i for i, caps in enumerate(grouped) if not all(caps)]
            if empty:
                # Stock would answer "" here; decode those images again, the end token barred
                # from the first new position (min_length counts the prompt).
                retry = self._kwargs(opts, max(opts.min_length, self.prompt_length(prompt) + 1))
                again = self._generate(pixels[empty], prompt, retry)
                for j, i in enumerate(empty):
                    redo = again[j * n : (j + 1) * n]
                    grouped[i] = [a or b for a, b in zip(grouped[i], redo, strict=True)]
                log.info("re-decoded %d images whose caption was empty", len(empty))
        extra = opts.prompt.strip()
        if extra and self.spec.arch == "blip2_opt":  # the caption continues the caller's prompt
            grouped = [[f"{extra} {c}".strip() for c in caps] for caps in grouped]
        return grouped

    @staticmethod
    def _kwargs(opts: GenerationOptions, min_length: int) -> dict[str, Any]:
        return {
            "use_nucleus_sampling": opts.use_nucleus_sampling,
            "num_beams": opts.num_beams,
            "max_length": opts.max_length,
            "min_length": min_length,
            "top_p": opts.top_p,
            "repetition_penalty": opts.repetition_penalty,
            "num_captions": opts.num_captions,
        }

    def _generate(self, pixels: torch.Tensor, prompt: str, kw: dict[str, Any]) -> list[str]:
        if self.decode == "stock":
            # Blip2T5.generate casts the ViT output to fp32 (LAVIS keeps its Q-Former fp32 on
            # GPU); with every weight in bf16/fp16 autocast makes the dtypes meet.
            with self._autocast():
                return list(self.model.generate({"image": pixels, "prompt": prompt}, **kw))
        from captioner.blip2_decode import decode_texts, opt_generate, query_embeds

        inputs_opt = query_embeds(self.model, pixels)
        ids = opt_generate(self.model, inputs_opt, prompt, **kw)
        return decode_texts(self.model, ids, self._opt_prompt_len(prompt))
