"""The captioning model: loading, preprocessing and generation.

Everything goes through Salesforce LAVIS's own classes (`BlipCaption`, its ViT encoder,
`XBertLMHeadDecoder`). The real `blip_caption`/`large_coco` model is described by LAVIS's config;
a small local model (e.g. `models/tiny-shapes/model.yaml`) by a YAML file of sizes (model_spec.py).
Both are assembled, loaded and run by the same code below; device and precision are decided in
model_device.py, model files fetched by model_files.py.

Two things differ from stock LAVIS on purpose:
- the tokenizer is read from local files (stock LAVIS asks the Hugging Face hub every time), so a
  filled `MODEL_DIR` loads with no network at all;
- generation options really reach the decoder (a conditional prompt, the caller's repetition
  penalty when sampling, several distinct beam captions).

Run ``python blip2_model.py download`` to fetch the real files for an air-gapped deploy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioning.errors import InvalidOption
from captioning.options import GenerationOptions
from image_prep import image_transform, prepare_pixels
from model_spec import (
    TOKENIZER_DIRNAME,
    ModelError,
    ModelFilesMissing,
    ModelSpec,
    lavis_spec,
    yaml_spec,
)

if TYPE_CHECKING:  # heavy imports stay out of import time
    import torch
    from PIL import Image
    from transformers import BertTokenizer

    from model_device import DevicePlan
    from settings import Settings

log = logging.getLogger(__name__)

DECODERS = ("fast", "stock")

# The model's vocabulary, re-exported so callers need one import for "the model".
__all__ = [
    "TOKENIZER_DIRNAME",
    "Captioner",
    "GenerationOptions",
    "ModelError",
    "ModelFilesMissing",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "image_transform",
    "lavis_spec",
    "load_checkpoint",
    "prepare_pixels",
    "stock_generate",
    "write_placeholder_tokenizer",
    "yaml_spec",
]


# --------------------------------------------------------------------------- assembly


def load_tokenizer(tokenizer_dir: Path) -> BertTokenizer:
    """BLIP's tokenizer (BERT WordPiece plus [DEC] and [ENC]) from local files only."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


def import_lavis() -> None:
    """Import LAVIS once and undo its process-wide side effect on Pillow.

    `lavis.datasets` sets `PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True` at import, which would make
    every later decode in this process accept truncated images (grey-filled) instead of refusing
    them with 400. Captioning never needs it, so the default is restored right away.
    """
    import lavis  # noqa: F401  (the import is the point)
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False


def _blip_caption_class() -> type:
    """LAVIS's BlipCaption, with its tokenizer taken from local files instead of the hub."""
    import_lavis()
    from lavis.models.blip_models.blip_caption import BlipCaption

    class LocalBlipCaption(BlipCaption):
        def __init__(self, image_encoder: Any, text_decoder: Any, tokenizer: Any, **kw: Any):
            # BlipCaption.__init__ calls init_tokenizer(); hand it ours before that happens.
            self._local_tokenizer = tokenizer
            super().__init__(image_encoder, text_decoder, **kw)

        def init_tokenizer(self) -> Any:  # type: ignore[override]
            return self._local_tokenizer

    return LocalBlipCaption


def build_model(spec: ModelSpec, tokenizer: BertTokenizer | None = None) -> Any:
    """Assemble a BlipCaption with freshly initialised weights (no checkpoint is read)."""
    import_lavis()
    from lavis.models.med import XBertLMHeadDecoder
    from lavis.models.vit import VisionTransformerEncoder
    from transformers import BertConfig

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_dir)
    if spec.lavis_cfg is not None:
        image_encoder = VisionTransformerEncoder.from_config(spec.lavis_cfg)
        text_decoder = XBertLMHeadDecoder.from_config(spec.lavis_cfg)
    else:
        image_encoder = VisionTransformerEncoder(img_size=spec.image_size, **spec.vit)
        image_encoder.vision_width = spec.vit["embed_dim"]
        med = {
            "add_cross_attention": True,
            "add_type_embeddings": False,
            "pad_token_id": tokenizer.pad_token_id,
            "encoder_width": spec.vit["embed_dim"],
            "vocab_size": len(tokenizer),
            **spec.text_decoder,
        }
        text_decoder = XBertLMHeadDecoder(config=BertConfig(**med))
    cls = _blip_caption_class()
    return cls(
        image_encoder,
        text_decoder,
        tokenizer,
        prompt=spec.prompt,
        max_txt_len=spec.max_txt_len,
    )


def load_checkpoint(model: Any, path: Path) -> None:
    """Load weights strictly enough to catch a wrong or truncated file (LAVIS is lenient)."""
    import torch

    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, wrong format, unsafe pickle
        raise ModelError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds no state dict")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ModelError(
            f"checkpoint {path} does not fit the model: {len(missing)} weights missing "
            f"(first: {', '.join(missing[:3])})"
        )
    if result.unexpected_keys:
        log.info("checkpoint has %d unused entries", len(result.unexpected_keys))


def write_placeholder_tokenizer(directory: Path, vocab_size: int = 30522) -> Path:
    """A WordPiece vocab of `vocab_size` made-up tokens, for running the full-size architecture
    with random weights (benchmarks, tests) where the real bert-base-uncased files are absent."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of"]
    words += [chr(c) for c in range(ord("b"), ord("z") + 1)]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return directory


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- download


# --------------------------------------------------------------------------- runtime


class Captioner:
    """A loaded captioning model that captions a list of images in one batch.

    Not thread-safe: one inference worker owns it (see batcher.py).
    """

    def __init__(
        self,
        model: Any,
        spec: ModelSpec,
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
        self.tokenizer = model.tokenizer
        self.decode = decode
        self._torch = torch
        if decode == "fast":
            import fast_decode

            fast_decode.optimize_model(self.model)  # fused ViT attention; fp32 untouched

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def identity(self) -> str:
        """Part of the result-cache key: which weights, precision and decoder made a caption."""
        ckpt = self.spec.checkpoint
        stamp = ""
        if ckpt is not None and ckpt.is_file():
            st = ckpt.stat()
            stamp = f"{st.st_size}:{int(st.st_mtime)}"
        # fp32 captions are identical whichever decoder runs; low precision ones may differ.
        decoder = "" if self.precision == "fp32" else f"|{self.decode}"
        return f"{self.spec.name}|{stamp}|{self.precision}{decoder}"

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Settings, plan: DevicePlan | None = None) -> Captioner:
        """Load the configured model (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE from MODEL_DIR) on
        the planned device; the plan comes first, so an unusable DEVICE fails before loading."""
        import torch

        import model_files
        from model_device import plan_device

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        plan = plan or plan_device(settings.device, settings.precision)
        device, precision = plan.device, plan.precision
        spec = model_files.configured_spec(settings)
        started = time.monotonic()
        model = build_model(spec)
        if spec.checkpoint is not None:
            load_checkpoint(model, spec.checkpoint)
        log.info(
            "loaded %s (%.1fM parameters) on %s in %s in %.1fs",
            spec.name,
            count_parameters(model) / 1e6,
            device,
            precision,
            time.monotonic() - started,
        )
        return cls(model, spec, device=device, precision=precision, decode=settings.decode)

    # -- inference ---------------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One image as the model's input: square resize (bicubic), to tensor, CLIP-normalise.
        Thread-safe and free of torch parallel regions (see :func:`prepare_pixels`), so request
        threads prepare in parallel and queue small tensors, not images."""
        return prepare_pixels(image, self.spec)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._torch.stack([self.prepare(img) for img in images])

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = self._torch.bfloat16 if self.precision == "bf16" else self._torch.float16
        return self._torch.autocast(self.device.split(":")[0], dtype=dtype)

    def check_options(self, options: GenerationOptions) -> GenerationOptions:
        """Validate options, including what depends on this model's tokenizer: the decoder
        prompt (the model's own "a picture of " plus `prompt`) must leave room for at least
        one generated token within max_length (beam search fails otherwise)."""
        opts = options.validate()
        used = self._prompt_ids(self._prompt_text(opts), 1).size(1)
        if used >= opts.max_length:
            raise InvalidOption(
                "max_length",
                f"max_length must be more than the {used} tokens of the decoder prompt "
                f"(the model's {self.spec.prompt.strip()!r} plus prompt)",
            )
        return opts

    def _prompt_text(self, opts: GenerationOptions) -> str:
        extra = opts.prompt.strip()
        return self.spec.prompt + extra + (" " if extra else "")

    def _prompt_ids(self, prompt_text: str, batch: int) -> torch.Tensor:
        """Token ids of the decoder prompt: [DEC] + prompt words (LAVIS drops the final [SEP])."""
        ids = self.tokenizer([prompt_text] * batch, return_tensors="pt").input_ids
        ids[:, 0] = self.tokenizer.bos_token_id
        return ids[:, :-1].to(self.device)

    def caption(
        self, images: Sequence[Image.Image], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """Caption every image in one batch; `num_captions` captions per image, in order."""
        return self.caption_prepared([self.prepare(img) for img in images], options)

    def caption_prepared(
        self, prepared: Sequence[torch.Tensor], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """`caption` for images already through :meth:`prepare` (what the batcher queues)."""
        opts = self.check_options(options or GenerationOptions())
        if not prepared:
            return []
        pixels = self._torch.stack(list(prepared)).to(device=self.device, dtype=self.dtype)
        with self._torch.inference_mode(), self._autocast():
            embeds = self.model.forward_encoder({"image": pixels})
            texts = self._decode(embeds, opts)
        n = opts.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(prepared))]

    def _decode(self, embeds: torch.Tensor, opts: GenerationOptions) -> list[str]:
        prompt_text = self._prompt_text(opts)
        sampling = opts.use_nucleus_sampling
        if sampling and self.decode != "fast":
            # Independent samples: one row per caption (LAVIS repeats the image the same way);
            # the fast decoder gives the same ids from one row with num_return_sequences.
            embeds = embeds.repeat_interleave(opts.num_captions, 0)
        prompt_ids = self._prompt_ids(prompt_text, embeds.size(0))
        kwargs = {
            "max_length": opts.max_length,
            "min_length": opts.min_length,
            "eos_token_id": self.tokenizer.sep_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "repetition_penalty": opts.repetition_penalty,
        }
        if sampling:
            per_row = opts.num_captions if self.decode == "fast" else 1
            kwargs.update(do_sample=True, top_p=opts.top_p, num_return_sequences=per_row)
        else:
            kwargs.update(num_beams=opts.num_beams, num_return_sequences=opts.num_captions)
        out = self._generate(prompt_ids, embeds, **kwargs)
        decoded = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        strip = len(self.spec.prompt)
        return [text[strip:] for text in decoded]

    def _generate(self, prompt_ids: torch.Tensor, embeds: torch.Tensor, **kw: Any) -> torch.Tensor:
        """Run the decoder: our cached-cross-attention path, or stock Hugging Face generate."""
        if self.decode == "fast":
            import fast_decode

            return fast_decode.generate(self.model.text_decoder, prompt_ids, embeds, **kw)
        return stock_generate(self.model.text_decoder, prompt_ids, embeds, **kw)

    def warmup(self) -> None:
        """One caption on a blank image so the first request does not pay for lazy init."""
        from PIL import Image

        self.caption([Image.new("RGB", (self.spec.image_size,) * 2, (127, 127, 127))])

    def choose_threads(self, batch: int = 1) -> int:
        """All cores or one, whichever captions faster (see cpu_threads.choose_threads)."""
        from cpu_threads import choose_threads

        return choose_threads(self, batch)


def stock_generate(
    decoder: Any, prompt_ids: torch.Tensor, embeds: torch.Tensor, **kw: Any
) -> torch.Tensor:
    """LAVIS `generate_from_encoder`, minus its forced sampling penalty: one row per beam."""
    import torch

    if not kw.get("do_sample"):
        embeds = embeds.repeat_interleave(kw.get("num_beams", 1), dim=0)
    atts = torch.ones(embeds.size()[:-1], dtype=torch.long, device=embeds.device)
    return decoder.generate(
        input_ids=prompt_ids, encoder_hidden_states=embeds, encoder_attention_mask=atts, **kw
    )


# --------------------------------------------------------------------------- CLI


def _cli(argv: Sequence[str] | None = None) -> int:
    from model_files import add_download_parser, cli_download
    from settings import Settings

    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["doctor"]:  # its own flags (--device, --precision, --json)
        import model_doctor

        return model_doctor.main(args_in[1:])
    parser = argparse.ArgumentParser(prog="blip2_model.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_download_parser(sub)
    sub.add_parser("doctor", help="what this machine can run the model on, and why")
    cap = sub.add_parser("caption", help="caption image files with the configured model")
    cap.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(args_in)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    if args.command == "download":
        return cli_download(args, settings)

    from PIL import Image

    captioner = Captioner.load(settings)
    images = [Image.open(p).convert("RGB") for p in args.images]
    for path, caps in zip(args.images, captioner.caption(images), strict=True):
        print(json.dumps({"file": str(path), "caption": caps[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
