"""Is a module tree plain: its classes' own arithmetic, nothing patched on or hooked in?

The flat forms of the BLIP decoder step (flat_decoder.py) and ViT (flat_encoder.py) read a
model's weights and issue the ATen calls its modules would. That is only the same computation
while every module runs its class's `forward` unchanged: in eval mode (dropout off), without
forward hooks (a module's or torch's global ones), without a per-instance `forward` (packed bf16
linear layers, see packed_linear.py), and with plain torch leaves whose weights are read
directly (a Linear subclass, e.g. LoRA or a fused variant, computes something else).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Linear", "Norm", "linear_args", "norm_args", "plain_modules"]

Linear = tuple[Any, Any]  # (weight, bias) as F.linear takes them
Norm = tuple[tuple[int, ...], Any, Any, float]  # (shape, weight, bias, eps) as F.layer_norm


def plain_modules(root: Any, leaves: tuple[type, ...], patched: Sequence[Any] = ()) -> bool:
    """True when every module under `root` is in eval mode, unhooked and unpatched (but for the
    modules in `patched`, whose own `forward` the caller knows), and every instance of a `leaves`
    class is exactly that class (not a subclass)."""
    import torch

    known = {id(m) for m in patched if m is not None}
    for module in root.modules():
        if module.training or ("forward" in module.__dict__ and id(module) not in known):
            return False
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        if isinstance(module, leaves) and type(module) not in leaves:
            return False
    hooks = torch.nn.modules.module
    return not (
        getattr(hooks, "_global_forward_hooks", None)
        or getattr(hooks, "_global_forward_pre_hooks", None)
    )


def linear_args(module: Any) -> Linear:
    """A Linear module's (weight, bias), as `F.linear(x, *args)` takes them."""
    return (module.weight, module.bias)


def norm_args(module: Any) -> Norm:
    """A LayerNorm module's (shape, weight, bias, eps), as `F.layer_norm(x, *args)` takes them."""
    return (tuple(module.normalized_shape), module.weight, module.bias, float(module.eps))
