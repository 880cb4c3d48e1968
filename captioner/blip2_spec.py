"""What a BLIP-2 model is made of (`Blip2Spec`), for the LAVIS zoo models and local YAML ones.

Stock LAVIS 1.0.2 fetches five things by name from the network on every load (EVA ViT-g, the
bert-base-uncased tokenizer and config, the OPT/FlanT5 language model and its tokenizer, the
caption checkpoint). Here every one of them is a local path in the spec, so a filled MODEL_DIR
(or a model folder such as models/tiny-blip2/) loads with no network at all. The file table
(`zoo_files`) says where each file comes from, for the download command and docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.spec import CLIP_MEAN, CLIP_STD, ModelError
from captioner.spec import read_model_yaml as read_model_yaml  # re-exported for the scripts

ARCHS = ("blip2_opt", "blip2_t5")
BERT_DIRNAME = "bert-base-uncased"
BERT_FILES = ("vocab.txt", "tokenizer_config.json", "config.json")
HF = "https://huggingface.co"
LAVIS_BUCKET = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"

#: LAVIS `create_eva_vit_g` (lavis/models/eva_vit.py) as VisionTransformer arguments.
EVA_VIT_G: dict[str, Any] = {
    "patch_size": 14,
    "embed_dim": 1408,
    "depth": 39,
    "num_heads": 1408 // 88,
    "mlp_ratio": 4.3637,
}

#: Language-model files on the Hugging Face hub (name, approximate bytes). Sizes are the hub's
#: listing as far as known here (no network in this workplace); SHA-256 is recorded on download.
LM_FILES: dict[str, tuple[tuple[str, int], ...]] = {
    "facebook/opt-2.7b": (
        ("config.json", 700),
        ("vocab.json", 899_000),
        ("merges.txt", 456_000),
        ("tokenizer_config.json", 700),
        ("special_tokens_map.json", 300),
        ("pytorch_model.bin", 5_300_000_000),
    ),
    "facebook/opt-6.7b": (
        ("config.json", 700),
        ("vocab.json", 899_000),
        ("merges.txt", 456_000),
        ("tokenizer_config.json", 700),
        ("special_tokens_map.json", 300),
        ("pytorch_model.bin.index.json", 41_000),
        ("pytorch_model-00001-of-00002.bin", 9_960_000_000),
        ("pytorch_model-00002-of-00002.bin", 3_360_000_000),
    ),
    "google/flan-t5-xl": (
        ("config.json", 1_500),
        ("spiece.model", 792_000),
        ("tokenizer.json", 2_420_000),
        ("tokenizer_config.json", 2_500),
        ("special_tokens_map.json", 2_200),
        ("pytorch_model.bin.index.json", 53_000),
        ("pytorch_model-00001-of-00002.bin", 9_450_000_000),
        ("pytorch_model-00002-of-00002.bin", 1_950_000_000),
    ),
}


@dataclass
class Blip2Spec:
    """Everything needed to assemble a LAVIS Blip2OPT/Blip2T5 from local files."""

    name: str
    arch: str
    image_size: int
    bert_dir: Path  # Blip2Base's BERT tokenizer; its config.json shapes the Q-Former
    lm_dir: Path  # Hugging Face folder: config, weights, tokenizer of the language model
    checkpoint: Path | None  # the caption checkpoint (everything but the frozen LM)
    prompt: str = "a photo of"
    max_txt_len: int = 32
    num_query_token: int = 32
    cross_attention_freq: int = 2
    vit: dict[str, Any] = field(default_factory=lambda: dict(EVA_VIT_G))
    qformer: dict[str, Any] = field(default_factory=dict)  # BertConfig overrides (tiny models)
    vit_checkpoint: Path | None = None  # eva_vit_g.pth: only if the caption file lacks the ViT
    lm_hub_id: str = ""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def missing_files(self) -> list[Path]:
        """Files that must exist before loading (weights are checked key by key later)."""
        wanted = [self.bert_dir / "vocab.txt", self.lm_dir / "config.json"]
        if not self.qformer:
            wanted.append(self.bert_dir / "config.json")
        if self.checkpoint is not None:
            wanted.append(self.checkpoint)
        return [p for p in wanted if not p.is_file()]


def _lavis_blip2_config(model_name: str, model_type: str) -> dict[str, Any]:
    """LAVIS's own YAML for a BLIP-2 zoo model, read without importing LAVIS."""
    import importlib.util

    import yaml

    found = importlib.util.find_spec("lavis")
    if found is None or not found.submodule_search_locations:
        raise ModelError("salesforce-lavis is not installed")
    configs = Path(next(iter(found.submodule_search_locations))) / "configs" / "models" / "blip2"
    short = model_type.removeprefix("caption_coco_")
    path = configs / f"blip2_caption_{short}.yaml"
    if not model_type.startswith("caption_coco_") or not path.is_file():
        known = sorted(
            "caption_coco_" + p.stem.removeprefix("blip2_caption_")
            for p in configs.glob("blip2_caption_*.yaml")
        )
        raise ModelError(f"MODEL_TYPE={model_type!r} is unknown; choose one of {', '.join(known)}")
    return dict(yaml.safe_load(path.read_text(encoding="utf-8"))["model"])


def lavis_blip2_spec(model_name: str, model_type: str, model_dir: Path) -> Blip2Spec:
    """`blip2_opt` caption_coco_opt2.7b/6.7b or `blip2_t5` caption_coco_flant5xl in model_dir.

    Layout: MODEL_DIR/bert-base-uncased/, MODEL_DIR/<hub id>/ (e.g. facebook/opt-2.7b/),
    MODEL_DIR/blip2_caption_opt2.7b.pth, and optionally MODEL_DIR/eva_vit_g.pth."""
    if model_name not in ARCHS:
        raise ModelError(f"MODEL_NAME={model_name!r} is not a BLIP-2 family; use {ARCHS}")
    cfg = _lavis_blip2_config(model_name, model_type)
    hub_id = str(cfg.get("opt_model") or cfg.get("t5_model") or "")
    if (model_name == "blip2_opt") != ("opt_model" in cfg):
        raise ModelError(f"MODEL_TYPE={model_type!r} does not belong to MODEL_NAME={model_name}")
    vit_file = model_dir / "eva_vit_g.pth"
    return Blip2Spec(
        name=f"{model_name}/{model_type}",
        arch=model_name,
        image_size=int(cfg.get("image_size", 364)),
        bert_dir=model_dir / BERT_DIRNAME,
        lm_dir=model_dir / hub_id,
        checkpoint=model_dir / Path(str(cfg["finetuned"])).name,
        prompt=str(cfg.get("prompt", "")),
        max_txt_len=int(cfg.get("max_txt_len", 32)),
        num_query_token=int(cfg.get("num_query_token", 32)),
        vit_checkpoint=vit_file if vit_file.is_file() else None,
        lm_hub_id=hub_id,
    )


def zoo_files(
    spec: Blip2Spec,
    model_dir: Path,
    *,
    bert_url: str = f"{HF}/bert-base-uncased/resolve/main/",
    hub_url: str = HF,
    bucket_url: str = LAVIS_BUCKET,
) -> list[tuple[str, Path, int]]:
    """(URL, destination, approximate bytes) of every file a zoo model needs; 0 = size unknown.
    The URLs' bases are settings (TOKENIZER_URL, HF_ENDPOINT, BLIP2_CHECKPOINT_BASE_URL), so a
    mirror or a local copy serves them as well."""
    bert = bert_url.rstrip("/")
    hub = hub_url.rstrip("/")
    files = [(f"{bert}/{name}", spec.bert_dir / name, 0) for name in BERT_FILES]
    files += [
        (f"{hub}/{spec.lm_hub_id}/resolve/main/{name}", spec.lm_dir / name, size)
        for name, size in LM_FILES.get(spec.lm_hub_id, ())
    ]
    if spec.checkpoint is not None:
        files.append((f"{bucket_url.rstrip('/')}/{spec.checkpoint.name}", spec.checkpoint, 0))
    return files


def yaml_blip2_spec(path: Path, raw: dict[str, Any]) -> Blip2Spec:
    """The spec of a local BLIP-2 model folder described by YAML (models/tiny-blip2/model.yaml)."""
    base = path.resolve().parent
    try:
        arch = str(raw["arch"])
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
        checkpoint = raw.get("checkpoint")
        vit_ckpt = raw.get("vit_checkpoint")
        return Blip2Spec(
            name=str(raw.get("name", path.parent.name)),
            arch=arch,
            image_size=int(raw["image_size"]),
            bert_dir=(base / str(raw.get("tokenizer", "."))).resolve(),
            lm_dir=(base / str(raw["language_model"])).resolve(),
            checkpoint=(base / str(checkpoint)).resolve() if checkpoint else None,
            prompt=str(raw.get("prompt", "")),
            max_txt_len=int(raw.get("max_txt_len", 32)),
            num_query_token=int(raw["num_query_token"]),
            cross_attention_freq=int(raw.get("cross_attention_freq", 2)),
            vit=dict(raw.get("vit", EVA_VIT_G)),
            qformer=dict(raw.get("qformer", {})),
            vit_checkpoint=(base / str(vit_ckpt)).resolve() if vit_ckpt else None,
            mean=tuple(raw.get("mean", CLIP_MEAN)),  # type: ignore[arg-type]
            std=tuple(raw.get("std", CLIP_STD)),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"MODEL_CONFIG {path} is malformed: {exc!r}") from None
