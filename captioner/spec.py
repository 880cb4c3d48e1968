"""What a captioning model is made of: sizes, files, preprocessing and prompt (`ModelSpec`).

The real `blip_caption`/`large_coco` model is described by LAVIS's own YAML (read without importing
LAVIS, which takes ~15 s); a small local model (e.g. `models/tiny-shapes/model.yaml`) by a YAML file
of sizes. blip2_model.py assembles either from its spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LARGE_COCO_CHECKPOINT = "model_large_caption.pth"
TOKENIZER_DIRNAME = "bert-base-uncased"
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")


class ModelError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


class ModelFilesMissing(ModelError):
    """The checkpoint or tokenizer is not in MODEL_DIR and could not be downloaded."""


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


def read_model_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping of a MODEL_CONFIG file; `arch` in it says which family loads it."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read MODEL_CONFIG {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"MODEL_CONFIG {path} must be a YAML mapping")
    return raw


def yaml_spec(path: Path, raw: dict[str, Any] | None = None) -> ModelSpec:
    """The spec of a local model described by a YAML file (see models/tiny-shapes/model.yaml)."""
    raw = read_model_yaml(path) if raw is None else raw
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
