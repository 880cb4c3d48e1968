"""Attention for low-precision (bf16/fp16) runs, with the kernel chosen per machine at start-up.

PyTorch's fused CPU attention (`scaled_dot_product_attention`, a flash-attention kernel) is not
the fastest way everywhere. On the AMD EPYC (AVX-512 bf16, no AMX) of docs/performance.md, in
bf16, the ViT-L encoder's attention (16 heads x 577 tokens) took 92-104 ms per layer for a batch
of 8 fused, and 65 ms as plain matrix products one image at a time (q K^T, softmax, P V: the
attention maps of one image, 10 MB, stay in the cache); the decoder's cross-attention (3 beam
rows against 577 image tokens) took 1.34 ms fused and 0.69 ms as matrix products. On a GPU, and
on CPUs whose fused kernel is the faster one, fused stays. Timing both on this model's own
shapes, once, on the thread that runs the model, picks the right one for any machine.

The matrix-product form is what LAVIS itself computes in its ViT (and what its stock bf16 run
does under autocast), so it is no less accurate than stock; fp32 never comes here (its maths is
untouched, so fp32 captions stay identical to stock).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from captioner.timing import best_times

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FUSED = "fused"
MATMUL = "matmul"
KINDS = (FUSED, MATMUL)

#: Take the matrix-product form only when it is clearly faster (timing noise stays fused).
MARGIN = 0.95

#: Attention scores computed at once, in elements: one ViT-L image's (16 x 577 x 577 = 5.3M,
#: 10.6 MB in bf16) at a time measured fastest (4 images at a time: 30 % slower); small score
#: blocks (the decoder's few beam rows) go as one product for the whole batch.
SCORE_BLOCK = 8_000_000


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for (B, h, L, d) q and (B, h, T, d) k, v, in their dtype, as
    many batch items at a time as keep the scores within `SCORE_BLOCK` (so they stay in the
    cache). Autocast is off inside: it would widen the scores to fp32 and cast them back for
    the second product."""
    import torch

    batch, heads, queries, _ = q.shape
    if scale is None:
        scale = q.shape[-1] ** -0.5
    step = max(1, SCORE_BLOCK // max(1, heads * queries * k.shape[-2]))
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    with torch.autocast(q.device.type, enabled=False):
        for b in range(0, batch, step):
            part = slice(b, b + step)
            scores = torch.matmul(q[part] * scale, k[part].transpose(-1, -2))
            torch.matmul(torch.softmax(scores, dim=-1), v[part], out=out[part])
    return out


def attend(
    kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention (no mask, no dropout) with the chosen kernel."""
    if kind == MATMUL:
        return matmul_attention(q, k, v, scale)
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def choose(
    dtype: torch.dtype,
    heads: int,
    queries: int,
    keys: int,
    head_dim: int,
    *,
    device: str = "cpu",
    batch: int = 1,
    rounds: int = 3,
) -> str:
    """`MATMUL` when, on this machine and for these shapes, the matrix-product form is clearly
    faster than the fused kernel (best of `rounds` each, interleaved), else `FUSED`. Always
    `FUSED` on a GPU and in fp32. Costs a few to a few hundred milliseconds, once."""
    import torch

    if not device.startswith("cpu") or dtype not in (torch.bfloat16, torch.float16):
        return FUSED
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, queries, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, heads, keys, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, heads, keys, head_dim, generator=gen).to(dtype)
    best = best_times({kind: functools.partial(attend, kind, q, k, v) for kind in KINDS}, rounds)
    chosen = MATMUL if best[MATMUL] < MARGIN * best[FUSED] else FUSED
    log.info(
        "attention %dx%d tokens, %d heads, %s: %s (fused %.2f ms, matrix products %.2f ms)",
        queries,
        keys,
        heads,
        str(dtype).removeprefix("torch."),
        chosen,
        best[FUSED] * 1e3,
        best[MATMUL] * 1e3,
    )
    return chosen
