"""The BLIP ViT as plain tensor calls: linear layers over two images' tokens, attention per image.

LAVIS's ViT (`lavis.models.vit`) computes attention with materialised maps, heads x tokens x
tokens floats per image and layer: 21 MB for ViT-L/16 at 384 px (577 tokens). Two images per call
make a 42 MB map, above glibc's largest mmap threshold (32 MiB, malloc_tuning.py), so every
attention op of every layer gets fresh pages from the kernel: the service encoded one image per
call (`CPU_ENCODER_TOKENS`), and its linear layers worked on 577 rows, where this machine's
matrix products run below their best rate (docs/performance.md: 231-299 GFLOP/s against 287-310
at 1,154 rows, on the Intel Xeon of the CPU table).

`FlatViT` runs the same ATen calls as the modules (`F.layer_norm`, `F.linear`, `matmul`,
`softmax`, the activation) but splits the two parts (a `Split`): norms, linear layers and the MLP
take up to `ROWS` tokens per call (two ViT-L images), the attention only as many images as keep
their maps within `MAP_BYTES` (one ViT-L image; a whole batch of the tiny model). The patch
embedding (a convolution) takes the linear layers' images.

Stock LAVIS encodes one image per call, and fp32 captions must stay stock's. A matrix product's
rows do not always come out the same whatever the other rows: MKL chooses its kernel and its
split between threads by shape (measured here: a 1024 x 3072 product differs in the last bit
for some row counts, 64 or 111, and not for 577 or 1154). So nothing is assumed: a
`SplitPlanner` (one per captioner) asks once per thread count, dtype and call size, on the
model's own weights and random inputs, whether that many images in one call (the patch
embedding, each linear layer with its activation; an attention) give each image's results bit
for bit as one image per call does, and uses one image per call where any differs; and whether
the flat block is the modules' block on one image, else the modules run. Where the scale is a
power of two (head size 64: 1/8) and the dtype fp32 or bf16, it is applied to the queries before
their product with the keys instead of to the scores after it: scaling by a power of two is
exact, so the result is the same bit for bit, on a ninth of the numbers (ViT-L: 64 per row
against 577; tests/test_flat_encoder.py).

Only a plain LAVIS ViT is flattened (plain.py: eval mode, no hooks or patched forwards, plain
torch Linear and LayerNorm; LAVIS's own Block, Attention and Mlp classes with their own forward
functions). Two patches are known to run LAVIS's own code and are allowed: fairscale's
gradient-checkpoint wrapper (on the last blocks of large_coco) and, in fp32 without autocast,
fast_decode.optimize_model's attention. `build` returns None otherwise, and the modules run.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captioner.plain import Linear, Norm, linear_args, norm_args, plain_modules

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = ["MAP_BYTES", "ROWS", "FlatViT", "Split", "SplitPlanner"]

#: Tokens per call of the norms, linear layers and MLP: two ViT-L/16 images at 384 px (577
#: tokens each), faster here than one, three or four per call (docs/performance.md); from three
#: on, the MLP's activations (9.5 MB per image each) near malloc's 32 MiB mmap threshold.
ROWS = 1280
#: Attention maps per call at most: below malloc's 32 MiB mmap threshold, so they are reused.
MAP_BYTES = 24 << 20

_VIT = "lavis.models.vit"


@dataclass(frozen=True)
class Split:
    """Images per call of the linear layers (`rows`) and per attention map (`maps`)."""

    rows: int = 1
    maps: int = 1


@dataclass(frozen=True)
class _Block:
    """One LAVIS `Block`'s weights: attention (qkv, heads, scale, proj) and MLP."""

    norm1: Norm
    qkv: Linear
    heads: int
    scale: float
    queries_first: bool  # scale exact as a power of two: applied to the queries
    proj: Linear
    norm2: Norm
    fc1: Linear
    act: Callable[[Any], Any]
    fc2: Linear


@dataclass(frozen=True)
class FlatViT:
    """A LAVIS `VisionTransformer`'s weights, laid out for `forward`. Holds references."""

    vit: Any  # the modules: the reference `matches_modules` compares with
    patch_embed: Callable[[Any], Any]
    image_shape: tuple[int, ...]  # (channels, height, width) the patch embedding takes
    cls_token: Any
    pos_embed: Any
    blocks: tuple[_Block, ...]
    norm: Norm

    @classmethod
    def build(cls, vit: Any) -> FlatViT | None:
        """The flat form of `vit` (LAVIS's ViT encoder), or None where it is not a plain one.
        Call it where the ViT will run (under autocast, if it will be): in bf16/fp16 or under
        autocast, fast_decode's patched attention runs its own kernel, and the modules must."""
        import torch

        dtype = vit.pos_embed.dtype
        low = dtype != torch.float32 or torch.is_autocast_enabled(vit.pos_embed.device.type)
        if not _plain(vit, low_precision=low):
            return None
        exact = dtype in (torch.float32, torch.bfloat16)  # fp16: x/8 can fall below its normals
        blocks = tuple(
            _Block(
                norm1=norm_args(block.norm1),
                qkv=linear_args(block.attn.qkv),
                heads=int(block.attn.num_heads),
                scale=float(block.attn.scale),
                queries_first=exact and math.frexp(float(block.attn.scale))[0] == 0.5,
                proj=linear_args(block.attn.proj),
                norm2=norm_args(block.norm2),
                fc1=linear_args(block.mlp.fc1),
                act=block.mlp.act,
                fc2=linear_args(block.mlp.fc2),
            )
            for block in vit.blocks
        )
        embed = vit.patch_embed
        return cls(
            vit=vit,
            patch_embed=embed,
            image_shape=(int(embed.proj.in_channels), *map(int, embed.img_size)),
            cls_token=vit.cls_token,
            pos_embed=vit.pos_embed,
            blocks=blocks,
            norm=norm_args(vit.norm),
        )

    @property
    def tokens(self) -> int:
        return int(self.pos_embed.shape[1])

    def wanted(self, count: int) -> Split:
        """For `count` images: `ROWS` tokens per linear call, `MAP_BYTES` of maps per attention
        call (never more images than there are)."""
        block = self.blocks[0]
        per_image = block.heads * self.tokens * self.tokens * self.pos_embed.element_size()
        rows = max(1, min(ROWS // self.tokens, count))
        return Split(rows=rows, maps=max(1, min(MAP_BYTES // per_image, rows)))

    @staticmethod
    def sizes(count: int, split: Split) -> set[tuple[str, int]]:
        """Every call size above one image that `forward(count images, split)` makes: ("rows",
        n) for the patch embedding and linear layers, ("maps", n) for the attention."""
        chunks = {min(split.rows, count), count % split.rows}
        groups = {g for c in chunks if c for g in (min(split.maps, c), c % split.maps)}
        return {("rows", n) for n in chunks if n > 1} | {("maps", n) for n in groups if n > 1}

    def forward(self, pixels: torch.Tensor, split: Split | None = None) -> torch.Tensor:
        """`VisionTransformer.forward(pixels)`: the image embeddings (B, tokens, width), at
        `split` (default: one image per call)."""
        import torch

        rows, maps = (split.rows, split.maps) if split else (1, 1)
        if len(pixels) <= rows:
            return self._forward(pixels, maps)
        return torch.cat(
            [self._forward(pixels[i : i + rows], maps) for i in range(0, len(pixels), rows)]
        )

    def _forward(self, pixels: torch.Tensor, maps: int) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        count = pixels.shape[0]
        x = self.patch_embed(pixels)
        x = torch.cat((self.cls_token.expand(count, -1, -1), x), dim=1)
        x = x + self.pos_embed[:, : x.size(1), :]  # pos_drop, drop_path: identity in eval
        for block in self.blocks:
            x = self._block(x, block, maps)
        return F.layer_norm(x, *self.norm)

    def _block(self, x: torch.Tensor, block: _Block, maps: int) -> torch.Tensor:
        """LAVIS `Block.forward` (drop_path: identity in eval)."""
        import torch.nn.functional as F

        h = F.layer_norm(x, *block.norm1)
        x = x + F.linear(self._attention(F.linear(h, *block.qkv), block, maps), *block.proj)
        inner = block.act(F.linear(F.layer_norm(x, *block.norm2), *block.fc1))
        return x + F.linear(inner, *block.fc2)

    @staticmethod
    def _attention(qkv: torch.Tensor, block: _Block, maps: int) -> torch.Tensor:
        """LAVIS `Attention.forward` from its qkv product to before `proj`, `maps` images'
        attention maps at a time."""
        import torch

        count, length, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        heads = block.heads
        qkv = qkv.reshape(count, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        parts = []
        for i in range(0, count, maps):
            q, k = query[i : i + maps], key[i : i + maps]
            if block.queries_first:
                scores = (q * block.scale) @ k.transpose(-2, -1)
            else:
                scores = (q @ k.transpose(-2, -1)) * block.scale
            weights = scores.softmax(dim=-1)  # attn_drop: identity in eval
            context = weights @ value[i : i + maps]
            parts.append(context.transpose(1, 2).reshape(-1, length, width))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _random(self, *shape: int) -> torch.Tensor:
        import torch

        rng = torch.Generator().manual_seed(sum(shape))
        return torch.randn(*shape, generator=rng).to(self.pos_embed.dtype)

    def matches_modules(self) -> bool:
        """The first block, flat, on one image is the modules' block bit for bit (its own
        weights, dtype, threads and kernels: the queries-first scale included)."""
        import torch

        x = self._random(1, self.tokens, int(self.blocks[0].qkv[0].shape[1]))
        with torch.inference_mode():
            return torch.equal(self._block(x, self.blocks[0], 1), self.vit.blocks[0](x))

    def agrees(self, kind: str, count: int) -> bool:
        """`count` images in one call give each image's results bit for bit as one image per
        call does: "rows", the patch embedding and each linear layer of a block (fc1 with its
        activation); "maps", its attention. Random inputs of the model's shapes and dtype (a
        kernel's choice depends on shapes and threads, not data)."""
        import torch
        import torch.nn.functional as F

        block, tokens = self.blocks[0], self.tokens
        width, hidden = int(block.qkv[0].shape[1]), int(block.fc2[0].shape[1])
        checks: list[tuple[Callable[[Any], Any], Any]]
        if kind == "maps":
            attend = functools.partial(self._attention, block=block)
            x = self._random(count, tokens, 3 * width)
            checks = [(lambda y: attend(y, maps=len(y)), x)]
        else:
            checks = [
                (self.patch_embed, self._random(count, *self.image_shape)),
                (lambda y: F.linear(y, *block.qkv), self._random(count, tokens, width)),
                (lambda y: F.linear(y, *block.proj), self._random(count, tokens, width)),
                (lambda y: block.act(F.linear(y, *block.fc1)), self._random(count, tokens, width)),
                (lambda y: F.linear(y, *block.fc2), self._random(count, tokens, hidden)),
            ]
        with torch.inference_mode():
            for f, x in checks:
                alone = torch.cat([f(x[i : i + 1]) for i in range(count)])
                if not torch.equal(f(x), alone):
                    return False
        return True


class SplitPlanner:
    """Which splits this machine's kernels compute bit for bit as one image per call, asked once
    per (threads, dtype, tokens, call size) and kept; one per captioner (its model)."""

    LIMIT = 1024  # distinct answers kept: call sizes are bounded by the batch size anyway

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], bool] = {}

    def plan(self, flat: FlatViT, count: int) -> Split | None:
        """The split for `count` images; None where the flat block differs from the modules'
        here (then the modules run)."""
        import torch

        base = (torch.get_num_threads(), str(flat.pos_embed.dtype), flat.tokens)
        if not self._ask(base + ("modules",), flat.matches_modules):
            return None
        want = flat.wanted(count)
        for kind, n in sorted(flat.sizes(count, want)):
            if not self._ask(base + (kind, n), functools.partial(flat.agrees, kind, n)):
                return Split()
        return want

    def _ask(self, key: tuple[Any, ...], check: Callable[[], bool]) -> bool:
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            started = time.monotonic()
            known = self._known[key] = check()
            log.info(
                "flat ViT %s: %s (checked in %.2fs)",
                key,
                "bit-identical" if known else "differs: fewer images per call",
                time.monotonic() - started,
            )
        return known


def _plain(vit: Any, *, low_precision: bool) -> bool:
    """LAVIS's own ViT classes in eval mode, unhooked and unpatched (plain.plain_modules), but
    for the instance forwards that run their class's own code (`_own_code`)."""
    import torch

    if type(vit).__module__ != _VIT or not hasattr(vit, "blocks") or not hasattr(vit, "norm"):
        return False
    if "forward_features" in vit.__dict__ or not _lavis_code(type(vit), "forward_features"):
        return False
    if type(vit.norm) is not torch.nn.LayerNorm:
        return False
    embed = getattr(vit, "patch_embed", None)
    if not hasattr(embed, "img_size") or type(getattr(embed, "proj", None)) is not torch.nn.Conv2d:
        return False  # timm's PatchEmbed, as LAVIS builds it
    known = []
    for block in vit.blocks:
        parts = {"Block": block, "Attention": getattr(block, "attn", None)}
        parts["Mlp"] = getattr(block, "mlp", None)
        if any(type(p).__module__ != _VIT or type(p).__name__ != n for n, p in parts.items()):
            return False  # a subclass, or another ViT
        if not all(_lavis_code(type(p), "forward") for p in parts.values()):
            return False  # a class patched in place
        if any(type(n) is not torch.nn.LayerNorm for n in (block.norm1, block.norm2)):
            return False
        for part in (block.attn, block.mlp):
            if "forward" in part.__dict__:
                if not _own_code(part, low_precision=low_precision):
                    return False
                known.append(part)
    return plain_modules(vit, (torch.nn.Linear, torch.nn.LayerNorm), patched=known)


def _own_code(module: Any, *, low_precision: bool) -> bool:
    """Whether `module`'s instance forward computes what its class's forward does: fairscale's
    checkpoint wrapper (LAVIS wraps the last ViT blocks of large models: checkpointing changes
    what is kept for a backward pass, not the values), and, in fp32, fast_decode's attention
    patch over either (in bf16/fp16 that patch runs its own kernel)."""
    own = module.__dict__
    forward = own["forward"]
    if own.get("_fast_decode_patched"):
        method = getattr(forward, "__func__", None)
        if low_precision or getattr(forward, "__self__", None) is not module:
            return False
        if (getattr(method, "__module__", ""), getattr(method, "__name__", "")) != (
            "captioner.fast_decode",
            "_vit_attention_forward",
        ):
            return False  # something else set over fast_decode's patch
        forward = own.get("_fast_decode_saved_forward")
        if forward is None:
            return True
    func, args = getattr(forward, "func", None), getattr(forward, "args", ())
    return (
        getattr(func, "__name__", "") == "_checkpointed_forward"
        and getattr(func, "__module__", "").startswith("fairscale.")
        and len(args) == 3
        and not getattr(forward, "keywords", None)
        and args[0] is type(module).forward
        and args[1]() is module
    )


def _lavis_code(cls: type, name: str) -> bool:
    """`cls.name` is defined in LAVIS's vit module (not replaced on the class in place)."""
    return getattr(getattr(cls, name, None), "__module__", "") == _VIT
