"""The captioning model: loading, preprocessing and generation.

Everything goes through Salesforce LAVIS's own classes (`BlipCaption`, its ViT encoder,
`XBertLMHeadDecoder`). The real `blip_caption`/`large_coco` model is described by LAVIS's config;
a small local model (e.g. `models/tiny-shapes/model.yaml`) by a YAML file of sizes. Both are
assembled, loaded and run by the same code below.

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
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay out of import time
    import torch
    from PIL import Image
    from transformers import BertTokenizer

    from settings import Settings

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LARGE_COCO_CHECKPOINT = "model_large_caption.pth"
TOKENIZER_DIRNAME = "bert-base-uncased"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")
DOWNLOAD_CONNECT_TIMEOUT = 10.0
DOWNLOAD_READ_TIMEOUT = 60.0
DECODERS = ("fast", "stock")


# --------------------------------------------------------------------------- errors


class ModelError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


class ModelFilesMissing(ModelError):
    """The checkpoint or tokenizer is not in MODEL_DIR and could not be downloaded."""


class GenerationOptionsError(ValueError):
    """A generation option is out of range; `param` names it for the HTTP layer."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class GenerationOptions:
    """How to decode. Defaults are the reference service's (CONTRACT.md "Model facts")."""

    num_beams: int = 3
    max_length: int = 30
    min_length: int = 10
    use_nucleus_sampling: bool = False
    top_p: float = 0.9
    num_captions: int = 1
    repetition_penalty: float = 1.0
    prompt: str = ""

    MAX_BEAMS = 10
    MAX_LENGTH = 75
    MAX_CAPTIONS = 5
    MAX_PROMPT_CHARS = 200

    def validate(self) -> GenerationOptions:
        """Raise GenerationOptionsError naming the first bad option and its allowed range."""
        if not 1 <= self.num_beams <= self.MAX_BEAMS:
            raise GenerationOptionsError(
                "num_beams", f"num_beams must be an integer from 1 to {self.MAX_BEAMS}"
            )
        if not 1 <= self.max_length <= self.MAX_LENGTH:
            raise GenerationOptionsError(
                "max_length", f"max_length must be an integer from 1 to {self.MAX_LENGTH}"
            )
        if not 0 <= self.min_length <= self.max_length:
            raise GenerationOptionsError(
                "min_length",
                f"min_length must be an integer from 0 to max_length ({self.max_length})",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationOptionsError("top_p", "top_p must be a number in (0, 1]")
        if not 1 <= self.num_captions <= self.MAX_CAPTIONS:
            raise GenerationOptionsError(
                "num_captions", f"num_captions must be an integer from 1 to {self.MAX_CAPTIONS}"
            )
        if not self.use_nucleus_sampling and self.num_captions > self.num_beams:
            raise GenerationOptionsError(
                "num_captions",
                f"num_captions must be at most num_beams ({self.num_beams}) without sampling",
            )
        if not 1.0 <= self.repetition_penalty <= 10.0:
            raise GenerationOptionsError(
                "repetition_penalty", "repetition_penalty must be a number from 1.0 to 10.0"
            )
        if len(self.prompt) > self.MAX_PROMPT_CHARS:
            raise GenerationOptionsError(
                "prompt", f"prompt must be at most {self.MAX_PROMPT_CHARS} characters"
            )
        return self

    def key(self) -> tuple[Any, ...]:
        """Hashable identity: requests with equal keys can share one batch and cache slot."""
        return (
            self.num_beams,
            self.max_length,
            self.min_length,
            self.use_nucleus_sampling,
            self.top_p if self.use_nucleus_sampling else None,
            self.num_captions,
            self.repetition_penalty,
            self.prompt,
        )


# --------------------------------------------------------------------------- model description


@dataclass
class ModelSpec:
    """Everything needed to assemble a BlipCaption: sizes, files, preprocessing, prompt."""

    name: str
    image_size: int
    tokenizer_dir: Path
    checkpoint: Path | None
    prompt: str = "a picture of "
    max_txt_len: int = 40
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # LAVIS config node (large_coco) or explicit sizes (local YAML); exactly one is used.
    lavis_cfg: Any = None
    vit: dict[str, Any] = field(default_factory=dict)
    text_decoder: dict[str, Any] = field(default_factory=dict)

    def missing_files(self) -> list[Path]:
        wanted = [self.tokenizer_dir / "vocab.txt"]
        if self.checkpoint is not None:
            wanted.append(self.checkpoint)
        return [p for p in wanted if not p.is_file()]


def _lavis_config_path(model_name: str, model_type: str) -> Path:
    """LAVIS's own YAML for a zoo model, found without importing LAVIS (which takes ~15 s)."""
    import importlib.util

    found = importlib.util.find_spec("lavis")
    if found is None or not found.submodule_search_locations:
        raise ModelError("salesforce-lavis is not installed")
    configs = Path(next(iter(found.submodule_search_locations))) / "configs" / "models"
    return configs / f"{model_name}_{model_type}.yaml"


def lavis_spec(model_name: str, model_type: str, model_dir: Path) -> ModelSpec:
    """The spec of a LAVIS zoo model (`blip_caption`/`large_coco`) with files in `model_dir`."""
    import yaml

    if model_name != "blip_caption":
        raise ModelError(f"MODEL_NAME={model_name!r} is not supported; use blip_caption")
    path = _lavis_config_path(model_name, model_type)
    if not path.is_file():
        known = sorted(
            p.stem.removeprefix("blip_caption_") for p in path.parent.glob("blip_caption_*")
        )
        raise ModelError(f"MODEL_TYPE={model_type!r} is unknown; choose one of {', '.join(known)}")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))["model"]
    checkpoint_name = Path(str(cfg["finetuned"])).name
    return ModelSpec(
        name=f"{model_name}/{model_type}",
        image_size=int(cfg.get("image_size", 384)),
        tokenizer_dir=model_dir / TOKENIZER_DIRNAME,
        checkpoint=model_dir / checkpoint_name,
        prompt=str(cfg.get("prompt", "a picture of ")),
        max_txt_len=int(cfg.get("max_txt_len", 40)),
        lavis_cfg=cfg,
    )


def yaml_spec(path: Path) -> ModelSpec:
    """The spec of a local model described by a YAML file (see models/tiny-shapes/model.yaml)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read MODEL_CONFIG {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"MODEL_CONFIG {path} must be a YAML mapping")
    base = path.resolve().parent
    try:
        vit = dict(raw["vit"])
        decoder = dict(raw["text_decoder"])
        checkpoint = raw.get("checkpoint")
        return ModelSpec(
            name=str(raw.get("name", path.parent.name)),
            image_size=int(raw["image_size"]),
            tokenizer_dir=(base / str(raw.get("tokenizer", "."))).resolve(),
            checkpoint=(base / str(checkpoint)).resolve() if checkpoint else None,
            prompt=str(raw.get("prompt", "a picture of ")),
            max_txt_len=int(raw.get("max_txt_len", 40)),
            mean=tuple(raw.get("mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(raw.get("std", CLIP_STD)),  # type: ignore[arg-type]
            vit=vit,
            text_decoder=decoder,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"MODEL_CONFIG {path} is malformed: {exc!r}") from None


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


def image_transform(spec: ModelSpec) -> Callable[[Image.Image], torch.Tensor]:
    """BLIP's eval preprocessing: exact square resize (bicubic), to tensor, CLIP normalise."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose(
        [
            transforms.Resize(
                (spec.image_size, spec.image_size), interpolation=InterpolationMode.BICUBIC
            ),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- download


def model_files(spec: ModelSpec, settings: Settings) -> list[tuple[str, Path]]:
    """(source URL, destination) for every file of a LAVIS zoo model."""
    base = settings.tokenizer_url.rstrip("/") + "/"
    files = [(base + name, spec.tokenizer_dir / name) for name in TOKENIZER_FILES]
    if spec.checkpoint is not None:
        files.append((settings.checkpoint_url, spec.checkpoint))
    return files


def download_file(
    url: str, dest: Path, *, expected_sha256: str | None = None, progress: bool = True
) -> str:
    """Stream `url` to `dest` atomically; return its SHA-256 (checked when one is expected)."""
    import requests
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            requests.get(
                url, stream=True, timeout=(DOWNLOAD_CONNECT_TIMEOUT, DOWNLOAD_READ_TIMEOUT)
            ) as resp,
        ):
            resp.raise_for_status()
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        sha = digest.hexdigest()
        if expected_sha256 and sha != expected_sha256.lower():
            raise ModelError(f"{dest.name}: SHA-256 {sha} does not match {expected_sha256}")
        os.replace(tmp_name, dest)
        return sha
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def download_model(
    spec: ModelSpec,
    settings: Settings,
    *,
    progress: bool = True,
    expected: dict[str, str] | None = None,
) -> dict[str, str]:
    """Fetch every missing file of `spec` into MODEL_DIR and record SHA256SUMS there."""
    sums: dict[str, str] = {}
    for url, dest in model_files(spec, settings):
        rel = dest.relative_to(settings.model_dir).as_posix()
        if dest.is_file():
            continue
        log.info("downloading %s -> %s", url, dest)
        sums[rel] = download_file(
            url, dest, expected_sha256=(expected or {}).get(rel), progress=progress
        )
    if sums:
        sums_file = settings.model_dir / "SHA256SUMS"
        old = sums_file.read_text(encoding="utf-8") if sums_file.is_file() else ""
        lines = [ln for ln in old.splitlines() if ln.strip() and ln.split()[-1] not in sums]
        lines += [f"{sha}  {rel}" for rel, sha in sums.items()]
        sums_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sums


def missing_files_message(spec: ModelSpec, settings: Settings, cause: str | None) -> str:
    missing = spec.missing_files()
    lines = [
        f"Model files for {spec.name} are missing from MODEL_DIR={settings.model_dir}:",
        *[f"  - {p}" for p in missing],
        "Expected: the LAVIS checkpoint "
        f"({LARGE_COCO_CHECKPOINT}, ~1.8 GB) and the bert-base-uncased tokenizer "
        f"({', '.join(TOKENIZER_FILES)}) in {settings.model_dir / TOKENIZER_DIRNAME}.",
        "Fetch them on a machine with internet and copy the folder here:",
        f"  MODEL_DIR={settings.model_dir} python blip2_model.py download",
        "or set MODEL_CONFIG to a local model.yaml (e.g. models/tiny-shapes/model.yaml).",
    ]
    if cause:
        lines.insert(1, f"Automatic download failed: {cause}")
    return "\n".join(lines)


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
        self.transform = image_transform(spec)
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
    def load(cls, settings: Settings) -> Captioner:
        """Load the configured model (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE from MODEL_DIR)."""
        import torch

        from model_device import resolve_device, resolve_precision

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        precision = resolve_precision(settings.precision, device)
        if settings.model_config is not None:
            spec = yaml_spec(settings.model_config)
            if spec.missing_files():
                raise ModelFilesMissing(
                    f"MODEL_CONFIG {settings.model_config} names files that do not exist: "
                    + ", ".join(str(p) for p in spec.missing_files())
                )
        else:
            spec = lavis_spec(settings.model_name, settings.model_type, settings.model_dir)
            if spec.missing_files():
                download = settings.model_download
                cause = None if download else "disabled (MODEL_DOWNLOAD=false)"
                if download:
                    try:
                        download_model(spec, settings)
                    except Exception as exc:  # no network, HTTP error, disk full
                        cause = f"{type(exc).__name__}: {exc}"
                if spec.missing_files():
                    raise ModelFilesMissing(missing_files_message(spec, settings, cause))
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

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to the model's square size (bicubic), to tensor, CLIP-normalise."""
        return self._torch.stack([self.transform(img.convert("RGB")) for img in images])

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = self._torch.bfloat16 if self.precision == "bf16" else self._torch.float16
        return self._torch.autocast(self.device.split(":")[0], dtype=dtype)

    def _prompt_ids(self, prompt_text: str, batch: int) -> torch.Tensor:
        """Token ids of the decoder prompt: [DEC] + prompt words (LAVIS drops the final [SEP])."""
        ids = self.tokenizer([prompt_text] * batch, return_tensors="pt").input_ids
        ids[:, 0] = self.tokenizer.bos_token_id
        return ids[:, :-1].to(self.device)

    def caption(
        self, images: Sequence[Image.Image], options: GenerationOptions | None = None
    ) -> list[list[str]]:
        """Caption every image in one batch; `num_captions` captions per image, in order."""
        opts = (options or GenerationOptions()).validate()
        if not images:
            return []
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        with self._torch.inference_mode(), self._autocast():
            embeds = self.model.forward_encoder({"image": pixels})
            texts = self._decode(embeds, opts)
        n = opts.num_captions
        return [texts[i * n : (i + 1) * n] for i in range(len(images))]

    def _decode(self, embeds: torch.Tensor, opts: GenerationOptions) -> list[str]:
        prompt_text = self.spec.prompt + opts.prompt.strip() + (" " if opts.prompt.strip() else "")
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
    from settings import Settings

    parser = argparse.ArgumentParser(prog="blip2_model.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch the checkpoint and tokenizer into MODEL_DIR")
    dl.add_argument("--model-dir", type=Path, help="overrides MODEL_DIR")
    dl.add_argument("--checkpoint-url", help="overrides CHECKPOINT_URL")
    dl.add_argument("--tokenizer-url", help="overrides TOKENIZER_URL (a folder URL)")
    dl.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX")
    cap = sub.add_parser("caption", help="caption image files with the configured model")
    cap.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()

    if args.command == "download":
        changes: dict[str, Any] = {}
        if args.model_dir:
            changes["model_dir"] = args.model_dir
        if args.checkpoint_url:
            changes["checkpoint_url"] = args.checkpoint_url
        if args.tokenizer_url:
            changes["tokenizer_url"] = args.tokenizer_url
        settings = settings.with_overrides(**changes)
        expected = dict(item.split("=", 1) for item in args.sha256)
        spec = lavis_spec(settings.model_name, settings.model_type, settings.model_dir)
        try:
            sums = download_model(spec, settings, expected=expected)
        except Exception as exc:
            print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        for rel, sha in sums.items():
            print(f"{sha}  {rel}")
        if spec.missing_files():
            print(missing_files_message(spec, settings, None), file=sys.stderr)
            return 1
        print(f"model files are complete in {settings.model_dir}")
        return 0

    from PIL import Image

    captioner = Captioner.load(settings)
    images = [Image.open(p).convert("RGB") for p in args.images]
    for path, caps in zip(args.images, captioner.caption(images), strict=True):
        print(json.dumps({"file": str(path), "caption": caps[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
