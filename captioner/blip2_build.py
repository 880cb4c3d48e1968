"""Assembling LAVIS 1.0.2's own Blip2OPT / Blip2T5 from local files, and loading its weights.

`Blip2OPT.__init__` (and Blip2T5's) fetches by name from the network: bert-base-uncased (the
tokenizer and the Q-Former's config and weights), EVA ViT-g, and the language model, which it
loads in fp16 (a CPU cannot run that). `local_blip2_class` builds the same module tree, line for
line as LAVIS's __init__ does, from the paths of a `Blip2Spec`; the language model is built on the
meta device and its weights assigned straight from its files in the precision asked for, so a
7 GB model never sits in memory twice. forward() and generate() stay LAVIS's own, untouched.

`load_weights` then fills the model from its three possible sources (eva_vit_g.pth, the caption
checkpoint, the language-model files) and fails naming every weight that none of them supplied.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from captioner.blip2_spec import Blip2Spec
from captioner.spec import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

LM_ATTR = {"blip2_opt": "opt_model", "blip2_t5": "t5_model"}
IGNORED_SUFFIXES = ("position_ids",)  # buffers rebuilt by the model, never learned


def _lavis_base(arch: str) -> type:
    from captioner.blip_build import import_lavis

    import_lavis()
    if arch == "blip2_opt":
        from lavis.models.blip2_models.blip2_opt import Blip2OPT

        return Blip2OPT
    from lavis.models.blip2_models.blip2_t5 import Blip2T5

    return Blip2T5


def load_bert_tokenizer(bert_dir: Path) -> Any:
    """`Blip2Base.init_tokenizer`, from local files."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_vision(spec: Blip2Spec) -> tuple[Any, Any]:
    """`Blip2Base.init_vision_encoder` for eva_clip_g, minus the download of eva_vit_g.pth."""
    from lavis.models.blip2_models.blip2 import LayerNorm
    from lavis.models.eva_vit import VisionTransformer
    from torch import nn

    vit = VisionTransformer(
        img_size=spec.image_size,
        use_mean_pooling=False,
        qkv_bias=True,
        drop_path_rate=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_checkpoint=False,
        **spec.vit,
    )
    return vit, LayerNorm(vit.num_features)


def build_qformer(spec: Blip2Spec, vision_width: int) -> tuple[Any, Any]:
    """`Blip2Base.init_Qformer` with the config from local files and no BERT weights: every
    Q-Former weight LAVIS keeps is in the caption checkpoint (the key check proves it)."""
    import torch
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel
    from torch import nn

    if spec.qformer:
        config = BertConfig(**spec.qformer)
    else:
        config = BertConfig.from_pretrained(str(spec.bert_dir), local_files_only=True)
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = spec.cross_attention_freq
    config.query_length = spec.num_query_token
    qformer = BertLMHeadModel(config)
    query_tokens = nn.Parameter(torch.zeros(1, spec.num_query_token, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


def _meta_lm(arch: str, lm_dir: Path) -> Any:
    """The language model with its weights on the meta device (no memory, no init time)."""
    import torch

    with torch.device("meta"):
        if arch == "blip2_opt":
            from lavis.models.blip2_models.modeling_opt import OPTConfig, OPTForCausalLM

            return OPTForCausalLM(OPTConfig.from_pretrained(str(lm_dir), local_files_only=True))
        from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration

        config = T5Config.from_pretrained(str(lm_dir), local_files_only=True)
        return T5ForConditionalGeneration(config)


def local_blip2_class(arch: str) -> type:
    """LAVIS's Blip2OPT/Blip2T5 with an __init__ that reads a `Blip2Spec` instead of the hub."""
    base = _lavis_base(arch)

    class LocalBlip2(base):  # type: ignore[misc, valid-type]
        def __init__(self, spec: Blip2Spec) -> None:
            from torch import nn

            super(base, self).__init__()  # Blip2Base/BaseModel: LAVIS's __init__ minus hub
            self.spec = spec
            self.tokenizer = load_bert_tokenizer(spec.bert_dir)
            self.visual_encoder, self.ln_vision = build_vision(spec)
            self.Qformer, self.query_tokens = build_qformer(spec, self.visual_encoder.num_features)
            # As LAVIS: the Q-Former's text-side parts are not used for captioning.
            self.Qformer.cls = None
            self.Qformer.bert.embeddings.word_embeddings = None
            self.Qformer.bert.embeddings.position_embeddings = None
            for layer in self.Qformer.bert.encoder.layer:
                layer.output = None
                layer.intermediate = None
            lm = _meta_lm(arch, spec.lm_dir)
            setattr(self, LM_ATTR[arch], lm)
            for param in lm.parameters():
                param.requires_grad = False
            self.max_txt_len = spec.max_txt_len
            self.prompt = spec.prompt
            if arch == "blip2_opt":
                from transformers import AutoTokenizer

                self.opt_tokenizer = AutoTokenizer.from_pretrained(
                    str(spec.lm_dir), use_fast=False, local_files_only=True
                )
                self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
                self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, lm.config.hidden_size)
                prompt_tokens = self.opt_tokenizer(self.prompt, return_tensors="pt")
                self.prompt_length = prompt_tokens.attention_mask.sum(1)
            else:
                from transformers import T5TokenizerFast

                self.t5_tokenizer = T5TokenizerFast.from_pretrained(
                    str(spec.lm_dir), local_files_only=True
                )
                self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, lm.config.hidden_size)
                self._apply_lemmatizer = False
                self._lemmatizer = None

        @property
        def language_model(self) -> Any:
            return getattr(self, LM_ATTR[arch])

    LocalBlip2.__name__ = LocalBlip2.__qualname__ = f"Local{base.__name__}"
    return LocalBlip2


def build_blip2(spec: Blip2Spec) -> Any:
    """The assembled model; the language model's weights are still on the meta device."""
    return local_blip2_class(spec.arch)(spec)


# --------------------------------------------------------------------------- weights


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mapped
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds no state dict")
    return data


def lm_weight_files(lm_dir: Path) -> list[Path]:
    """The language model's weight files, in the Hugging Face layouts (single or sharded)."""
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = lm_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
            return [lm_dir / n for n in names]
    for name in ("pytorch_model.bin", "model.safetensors"):
        if (lm_dir / name).is_file():
            return [lm_dir / name]
    return []


def _read_weights(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _torch_load(path)


def _assign(model: Any, state: dict[str, Any], prefix: str, dtype: Any) -> set[str]:
    """Load `state` (keys relative to `prefix`) into `model`; returns the full keys it filled.

    Meta tensors are replaced (assign) in every module that shares them (tied weights stay
    tied), real ones copied into; a shape mismatch is an error."""
    import torch

    own = model.state_dict(keep_vars=True)
    aliases = _aliases(model)
    filled: set[str] = set()
    for key in list(state):
        full = prefix + key
        if full not in own and prefix + "model." + key in own:  # OPT hub files: "decoder.*"
            full = prefix + "model." + key
        if full not in own:
            continue
        value = state.pop(key)
        target = own[full]
        if tuple(value.shape) != tuple(target.shape):
            raise ModelError(
                f"weight {full} has shape {tuple(value.shape)} in the file, "
                f"{tuple(target.shape)} in the model"
            )
        if target.is_meta:
            want = dtype if (dtype is not None and value.is_floating_point()) else target.dtype
            new = _put(model, aliases[full], value.to(want), target)
            own.update(dict.fromkeys(aliases[full], new))  # a tied twin is now real: copy
        else:
            with torch.no_grad():
                target.copy_(value)
        filled.add(full)
    if state:
        log.info("%d entries under %r matched no weight of the model", len(state), prefix)
    return filled


def _put(model: Any, keys: set[str], value: Any, old: Any) -> Any:
    """Make `value` the tensor of every key in `keys` (one tensor, so ties are kept)."""
    import torch

    new = (
        torch.nn.Parameter(value, requires_grad=old.requires_grad)
        if isinstance(old, torch.nn.Parameter)
        else value
    )
    for key in keys:
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(old, torch.nn.Parameter):
            owner._parameters[attr] = new
        else:
            owner._buffers[attr] = new
    return new


def _aliases(model: Any) -> dict[str, set[str]]:
    """Keys that name one tensor (tied weights, e.g. OPT's lm_head and embed_tokens)."""
    by_id: dict[int, set[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), set()).add(key)
    return {k: keys for keys in by_id.values() for k in keys}


def load_weights(model: Any, spec: Blip2Spec, lm_dtype: Any = None) -> dict[str, int]:
    """Fill every weight from eva_vit_g.pth, the caption checkpoint and the language-model files.

    Every weight of the model must come from one of them; anything else missing raises a
    ModelError that names it. Returns how many weights each source supplied."""
    lm_name = LM_ATTR[spec.arch]
    supplied: set[str] = set()
    counts: dict[str, int] = {}
    if spec.vit_checkpoint is not None:
        from lavis.models.eva_vit import interpolate_pos_embed

        state = _torch_load(spec.vit_checkpoint)
        interpolate_pos_embed(model.visual_encoder, state)
        got = _assign(model, state, "visual_encoder.", None)
        counts[spec.vit_checkpoint.name] = len(got)
        supplied |= got
    if spec.checkpoint is not None:
        got = _assign(model, _torch_load(spec.checkpoint), "", None)
        counts[spec.checkpoint.name] = len(got)
        supplied |= got
    lm_files = lm_weight_files(spec.lm_dir)
    for path in lm_files:
        got = _assign(model, _read_weights(path), lm_name + ".", lm_dtype)
        counts[path.name] = len(got)
        supplied |= got
    check_keys(model, supplied, spec, lm_files)
    return counts


def check_keys(model: Any, supplied: set[str], spec: Blip2Spec, lm_files: list[Path]) -> None:
    """Raise naming every weight that no file supplied (tied weights count once supplied)."""
    aliases = _aliases(model)
    covered = set(supplied)
    for key in supplied:
        covered |= aliases.get(key, set())
    lm_prefix = LM_ATTR[spec.arch] + "."
    missing = [
        k
        for k, v in model.state_dict(keep_vars=True).items()
        if (k not in covered or v.is_meta) and not k.endswith(IGNORED_SUFFIXES)
    ]
    if not missing:
        return
    lm_missing = [k for k in missing if k.startswith(lm_prefix)]
    other = [k for k in missing if not k.startswith(lm_prefix)]
    parts = []
    if other:
        src = spec.checkpoint.name if spec.checkpoint else "no caption checkpoint"
        parts.append(
            f"{len(other)} weights are in neither the caption checkpoint ({src}) nor the "
            f"language-model files: {', '.join(other[:5])}{' …' if len(other) > 5 else ''}"
        )
    if lm_missing:
        where = ", ".join(p.name for p in lm_files) or f"no weight files in {spec.lm_dir}"
        parts.append(
            f"{len(lm_missing)} language-model weights are missing from {where}: "
            f"{', '.join(lm_missing[:5])}{' …' if len(lm_missing) > 5 else ''}"
        )
    raise ModelError(f"{spec.name}: " + "; ".join(parts))


def randomize_meta(model: Any, dtype: Any, seed: int = 0) -> int:
    """Give every still-meta weight random values in `dtype` (full-size tests, benchmarks);
    returns how many distinct tensors it made (tied weights count once)."""
    import torch

    model.language_model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    done: set[str] = set()
    count = 0
    aliases = _aliases(model)
    for key, value in model.state_dict(keep_vars=True).items():
        if not value.is_meta or key in done:
            continue
        tensor = torch.empty(value.shape, dtype=dtype if value.is_floating_point() else value.dtype)
        if key.endswith("bias"):
            tensor.zero_()
        elif tensor.dim() == 1:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=gen)
        _put(model, aliases[key], tensor, value)
        done |= aliases[key]
        count += 1
    return count


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def to_precision(model: Any, device: str, dtype: torch.dtype) -> Any:
    """All of the model in one dtype on `device` (LAVIS's fp16 LM cast to fp32/bf16 on CPU)."""
    return model.to(device=device, dtype=dtype).eval()
