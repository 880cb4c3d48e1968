"""Assembling BLIP v1 (`blip_caption`) from LAVIS's own classes, and reading its checkpoint.

Everything goes through Salesforce LAVIS (`BlipCaption`, its ViT encoder, `XBertLMHeadDecoder`).
The real `blip_caption`/`large_coco` model is described by LAVIS's config, a small local model
(e.g. `models/tiny-shapes/model.yaml`) by a YAML file of sizes (captioner/spec.py); both are
assembled here. One difference from stock LAVIS on purpose: the tokenizer is read from local
files (stock LAVIS asks the Hugging Face hub every time), so a filled MODEL_DIR loads with no
network at all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.spec import ModelError, ModelSpec

if TYPE_CHECKING:  # heavy imports stay out of import time
    import torch
    from transformers import BertTokenizer

log = logging.getLogger(__name__)


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
