"""Linear layers whose weights are packed once for oneDNN, for bf16 on CPUs.

Why: a bf16 `F.linear` on a CPU hands oneDNN a plain row-major weight, and oneDNN re-lays it out
into its blocked format inside every call. For the ViT's products over a whole batch that costs
~10 %; for the decoder's steps (24 beam rows against 768 x 768 weights) it is most of the call.
Measured on the AMD EPYC of docs/performance.md (2 cores, AVX-512 bf16, no AMX), ViT-L linear
layers for a batch of 8: 924 ms per image plain against 831 ms packed (GELU fused into fc1);
one decoder step's linear layers and LM head, 24 rows: 28-42 ms plain, 20-26 ms packed. The
packed products are bit-identical to `F.linear` (same library, same kernels, without the
per-call reorder); fusing the exact GELU into the product rounds once instead of twice.

The packed call is PyTorch's own oneDNN linear (`torch.ops.mkldnn._linear_pointwise` on weights
from `torch.ops.mkldnn._reorder_linear_weight`), what inductor's CPU freezing emits. Whether it
is faster is timed once at start-up on the model's own shapes (`choose`), as cpu_attention does
for attention: CPUs whose plain path is as fast keep it.

Per instance only (no class is touched), idempotent, undone by `unpack_model`; the module tree
and state_dict are unchanged, and a weight changed after packing (reloaded, cast, edited in
place) is packed again on its next call, so a packed model never computes with stale weights.
The packed copies are held beside the original weights (kept for the state_dict, the tied
LM-head/embedding weights and `unpack_model`): +2 bytes per linear parameter, ~0.85 GB for
large_coco, less than its fp32 build at load time already took.
fp32 never comes here (its captions stay bit-identical to stock), nor does a GPU, nor BLIP-2
(its 3.7-7.7 B weights would need their size again beside them; blip_captioner.py packs).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from captioner.timing import best_times

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["available", "choose", "pack_model", "unpack_model"]

#: Pack only when the packed product is clearly faster (timing noise stays plain).
MARGIN = 0.95

#: Containers whose forward starts `act(linear(x))` with an exact GELU, by class name: (the
#: linear, the activation, what the container's forward does after them). The GELU is fused
#: into the packed product. LAVIS ViT `Mlp` (fc1 -> act -> drop -> fc2 -> drop), BERT
#: `BertIntermediate` (dense -> act), `BertPredictionHeadTransform` (dense -> act -> LayerNorm).
_GELU_CONTAINERS: dict[str, tuple[str, str, Callable[[Any, Any], Any]]] = {
    "Mlp": ("fc1", "act", lambda mlp, hidden: mlp.drop(mlp.fc2(mlp.drop(hidden)))),
    "BertIntermediate": ("dense", "intermediate_act_fn", lambda _, hidden: hidden),
    "BertPredictionHeadTransform": (
        "dense",
        "transform_act_fn",
        lambda head, hidden: head.LayerNorm(hidden),
    ),
}


def available(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether packed oneDNN products exist here for `dtype`: bf16 on a CPU with oneDNN."""
    import torch

    ops = torch.ops.mkldnn
    return (
        device.startswith("cpu")
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: Any, post: str) -> torch.Tensor:
    """x @ W^T + b (then GELU when `post` is "gelu") with the packed weight, in its dtype."""
    import torch

    if x.dtype != packed.dtype:
        x = x.to(packed.dtype)  # what autocast does for F.linear
    if post == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def choose(
    dtype: torch.dtype,
    shapes: list[tuple[int, int, int]],
    *,
    device: str = "cpu",
    rounds: int = 3,
) -> bool:
    """True when packed products are clearly faster than `F.linear` on these `(rows, in, out)`
    shapes together (best of `rounds` each, interleaved). False where they do not exist."""
    import torch
    import torch.nn.functional as F

    if not available(dtype, device):
        return False
    gen = torch.Generator().manual_seed(0)
    cases = []
    for rows, inputs, outputs in shapes:
        weight = (torch.randn(outputs, inputs, generator=gen) * inputs**-0.5).to(dtype)
        bias = torch.zeros(outputs, dtype=dtype)
        cases.append(
            (torch.randn(rows, inputs, generator=gen).to(dtype), weight, _pack(weight), bias)
        )

    def plain() -> None:
        for x, weight, _, bias in cases:
            F.linear(x, weight, bias)

    def packed() -> None:
        for x, _, packed_weight, bias in cases:
            _product(x, packed_weight, bias, "none")

    best = best_times({"plain": plain, "packed": packed}, rounds)
    chosen = best["packed"] < MARGIN * best["plain"]
    log.info(
        "linear layers, %s: %s (plain %.2f ms, packed %.2f ms)",
        str(dtype).removeprefix("torch."),
        "packed" if chosen else "plain",
        best["plain"] * 1e3,
        best["packed"] * 1e3,
    )
    return chosen


def pack_model(model: Any) -> int:
    """Pack the weight of every `nn.Linear` under `model` (bf16 weights only; others are left
    alone) and fuse exact GELUs into the products before them. Returns the linear layers packed."""
    import torch

    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, torch.nn.Linear)
            and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu"
        ):
            if "_packed_weight" not in module.__dict__:
                module._packed_saved_forward = module.__dict__.get("forward")
                _packed(module)
                module.forward = types.MethodType(_linear_forward, module)
            count += 1
    fused = 0
    for module in model.modules():
        fusable = _GELU_CONTAINERS.get(type(module).__name__)
        if fusable is None or "_packed_gelu" in module.__dict__:
            continue
        linear, act = (getattr(module, name, None) for name in fusable[:2])
        if linear is None or "_packed_weight" not in linear.__dict__ or not _exact_gelu(act):
            continue
        module._packed_gelu = fusable
        module._packed_saved_forward = module.__dict__.get("forward")
        module.forward = types.MethodType(_gelu_container_forward, module)
        fused += 1
    log.info("packed_linear: %d linear layers packed, %d GELUs fused", count, fused)
    return count


def unpack_model(model: Any) -> None:
    """Undo `pack_model`: every module runs its own forward again; the packed copies are freed."""
    for module in model.modules():
        if "_packed_weight" not in module.__dict__ and "_packed_gelu" not in module.__dict__:
            continue
        saved = module.__dict__.pop("_packed_saved_forward", None)
        for name in ("_packed_weight", "_packed_key", "_packed_gelu"):
            module.__dict__.pop(name, None)
        if saved is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = saved


def _exact_gelu(act: Any) -> bool:
    """nn.GELU without the tanh approximation, or Hugging Face's exact `GELUActivation`."""
    import torch

    if isinstance(act, torch.nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is (
        torch.nn.functional.gelu
    )


def _packed_ok(module: Any) -> bool:
    """Packed products carry no autograd: training or grad-tracking calls run the original."""
    import torch

    return not (module.training or (torch.is_grad_enabled() and module.weight.requires_grad))


def _original(module: Any, x: torch.Tensor) -> torch.Tensor:
    saved = module.__dict__.get("_packed_saved_forward")
    return saved(x) if saved is not None else type(module).forward(module, x)


def _packed(module: Any) -> torch.Tensor | None:
    """The module's packed weight, packed again if the weight changed since (a reload, an
    in-place edit, `.to()`); None when it is no longer bf16 on a CPU (the original runs)."""
    import torch

    weight = module.weight
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor has no version counter; nor can it change
        version = -1
    key = (weight.data_ptr(), version, weight.dtype, weight.device)
    if module.__dict__.get("_packed_key") != key:
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            return None
        module._packed_weight = _pack(weight)
        module._packed_key = key
    return module.__dict__["_packed_weight"]


def _linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    packed = _packed(self) if _packed_ok(self) and x.device.type == "cpu" else None
    if packed is None:
        return _original(self, x)
    return _product(x, packed, self.bias, "none")


def _gelu_container_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """The container's own forward with `act(linear(x))` as one packed product."""
    linear_name, _act_name, rest = self.__dict__["_packed_gelu"]
    linear = getattr(self, linear_name)
    packed = _packed(linear) if _packed_ok(linear) and x.device.type == "cpu" else None
    if packed is None:
        return _original(self, x)
    return rest(self, _product(x, packed, linear.bias, "gelu"))
