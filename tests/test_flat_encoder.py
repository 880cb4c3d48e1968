"""captioner/flat_encoder.py: the ViT as plain tensor calls, several images per linear layer and
a group of images per attention map, gives LAVIS's own embeddings bit for bit, and is used only
for a ViT it can flatten. The project's trained tiny model (head size 32: a scale that is not a
power of two) and a small LAVIS ViT of head size 16 (scale 1/4, applied to the queries)."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest


@pytest.fixture(scope="module")
def pixels(tiny_captioner: Any) -> Any:
    import torch

    import tiny_shapes

    rng = random.Random(31)
    return torch.stack([tiny_captioner.prepare(tiny_shapes.sample(rng)[0]) for _ in range(5)])


def modules_one_per_call(vit: Any, pixels: Any) -> Any:
    """LAVIS's modules, one image per call (how the service encoded ViT-L before)."""
    import torch

    return torch.cat([vit.forward_features(pixels[i : i + 1]) for i in range(len(pixels))])


@pytest.fixture(scope="module")
def small_vit() -> Any:
    """A LAVIS ViT with head size 16 (scale exactly 1/4), random weights, in eval mode."""
    import torch
    from lavis.models.vit import VisionTransformerEncoder

    torch.manual_seed(5)
    vit = VisionTransformerEncoder(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4)
    for p in vit.parameters():  # LAVIS zero-initialises biases: make every term count
        torch.nn.init.normal_(p, std=0.2)
    return vit.eval()


SPLITS = [(5, 5), (2, 1), (1, 1), (3, 2)]


@pytest.mark.parametrize(("rows", "maps"), SPLITS)
def test_flat_vit_is_the_modules_bit_for_bit(
    tiny_captioner: Any, pixels: Any, rows: int, maps: int
) -> None:
    """Images per linear call and per attention map wanted: all 5, 2 and 1, 1 and 1, 3 and 2;
    what `split` keeps of it on this machine's kernels gives the modules' embeddings."""
    import torch

    from captioner.flat_encoder import FlatViT, Split

    vit = tiny_captioner.model.visual_encoder
    flat = FlatViT.build(vit)
    assert flat is not None  # the tiny model is a plain LAVIS ViT
    assert not any(b.queries_first for b in flat.blocks)  # 32 ** -0.5 is not a power of two
    with torch.inference_mode():
        got = flat.forward(pixels, flat.split(Split(rows, maps)))
        assert torch.equal(got, modules_one_per_call(vit, pixels))
    assert not torch.equal(got[0], got[1])  # images differ: a real check


def test_split_wanted_and_checked(tiny_captioner: Any) -> None:
    """ViT-L/16 at 384 px: two images per linear call, one per map; the tiny model: a batch in
    both. `split` keeps the wanted split only where it is bit-identical to one image per call:
    an activation or a patch embedding that mixes images (stand-ins for a kernel that splits
    rows differently) falls back to one image per call."""
    import dataclasses

    import torch

    from captioner.flat_encoder import FlatViT, Split

    flat = FlatViT.build(tiny_captioner.model.visual_encoder)
    assert flat is not None
    large = dataclasses.replace(
        flat,
        pos_embed=torch.zeros(1, 577, 1024),
        blocks=(dataclasses.replace(flat.blocks[0], heads=16),),
    )
    assert large.wanted() == Split(rows=2, maps=1)
    assert flat.wanted() == Split(rows=34, maps=1148)
    assert flat.split(Split(8, 8)) == Split(8, 8)
    mixing = dataclasses.replace(
        flat, blocks=(dataclasses.replace(flat.blocks[0], act=lambda x: x - x.mean()),)
    )
    assert mixing.split(Split(8, 8)) == Split()
    assert mixing.split(Split()) == Split()
    embed = flat.patch_embed
    mixed_embed = dataclasses.replace(flat, patch_embed=lambda x: embed(x) - embed(x).mean())
    assert mixed_embed.split(Split(8, 1)) == Split()


def test_queries_first_only_where_it_is_exact(
    tiny_captioner: Any, small_vit: Any, pixels: Any
) -> None:
    """Head size 16: the scale 1/4 goes on the queries, bit-identical. On the tiny model
    (1/sqrt(32)) the same move changes the result, so the equality above is a real check. (With
    10 tokens per image, MKL's products here differ between 10 and 30 rows: `split` falls back
    to one image per call on this ViT, and still must give the modules' embeddings.)"""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from captioner.flat_encoder import FlatViT, Split

    images = F.interpolate(pixels, size=(48, 48), mode="bilinear", align_corners=False)
    flat = FlatViT.build(small_vit)
    assert flat is not None and all(b.queries_first for b in flat.blocks)
    tiny = tiny_captioner.model.visual_encoder
    forced = FlatViT.build(tiny)
    assert forced is not None
    forced = dataclasses.replace(
        forced, blocks=tuple(dataclasses.replace(b, queries_first=True) for b in forced.blocks)
    )
    with torch.inference_mode():
        got = flat.forward(images, flat.split(Split(3, 3)))
        assert torch.equal(got, modules_one_per_call(small_vit, images))
        assert not torch.equal(forced.forward(pixels), modules_one_per_call(tiny, pixels))


def test_captioner_encodes_through_the_flat_vit(tiny_captioner: Any, pixels: Any) -> None:
    """fp32 on a CPU: `encode` takes the flat path (its maps are materialised) and gives the
    modules' embeddings; with a forward hook on the ViT it runs the modules, and the hook fires."""
    import torch

    from captioner.flat_encoder import FlatViT

    vit = tiny_captioner.model.visual_encoder
    assert tiny_captioner.maps_on_cpu
    calls: list[int] = []
    with torch.inference_mode():
        expected = modules_one_per_call(vit, pixels)
        assert torch.equal(tiny_captioner.encode(pixels), expected)
        flat = FlatViT.build(vit)
        assert flat is not None
        assert tiny_captioner._vit_splits[torch.get_num_threads()] == flat.split()
        handle = vit.blocks[0].register_forward_hook(lambda *_: calls.append(1))
        try:
            assert torch.equal(tiny_captioner.encode(pixels), expected)
        finally:
            handle.remove()
    assert calls  # the modules ran


def _training(v: Any) -> None:
    v.blocks[1].mlp.drop.train()


def _hook(v: Any) -> None:
    v.blocks[0].attn.qkv.register_forward_hook(lambda *_: None)


def _pre_hook(v: Any) -> None:
    v.norm.register_forward_pre_hook(lambda *_: None)


def _patched_forward(v: Any) -> None:
    v.blocks[1].attn.forward = lambda x, register_hook=False: x


def _linear_subclass(v: Any) -> None:
    import torch

    class Lora(torch.nn.Linear):
        pass

    old = v.blocks[0].mlp.fc1
    new = Lora(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    v.blocks[0].mlp.fc1 = new.eval()


def _block_subclass(v: Any) -> None:
    from lavis.models.vit import Block

    class Mine(Block):
        pass

    v.blocks[0].__class__ = Mine


def _other_norm(v: Any) -> None:
    import torch

    v.blocks[1].norm2 = torch.nn.RMSNorm(64).eval()


def _checkpoint_over_other_code(v: Any) -> None:
    """fairscale's wrapper, but around a forward that is not the class's own."""
    import functools
    import weakref

    from fairscale.nn.checkpoint.checkpoint_activations import _checkpointed_forward

    mlp = v.blocks[0].mlp
    other = functools.partial(_checkpointed_forward, lambda m, x: x, weakref.ref(mlp), False)
    mlp.forward = other


NOT_PLAIN = [_training, _hook, _pre_hook, _patched_forward, _linear_subclass]
NOT_PLAIN += [_block_subclass, _other_norm, _checkpoint_over_other_code]


@pytest.mark.parametrize("change", NOT_PLAIN, ids=lambda f: f.__name__.strip("_"))
def test_not_plain_runs_the_modules(small_vit: Any, change: Any) -> None:
    from captioner.flat_encoder import FlatViT

    assert FlatViT.build(small_vit) is not None
    vit = copy.deepcopy(small_vit)
    change(vit)
    assert FlatViT.build(vit) is None


def test_global_hooks_run_the_modules(small_vit: Any) -> None:
    import torch

    from captioner.flat_encoder import FlatViT

    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert FlatViT.build(small_vit) is None
    finally:
        handle.remove()
    assert FlatViT.build(small_vit) is not None


def test_gradient_checkpointing_is_flattened(small_vit: Any) -> None:
    """LAVIS wraps large_coco's last 5 ViT blocks in fairscale's checkpoint wrapper, which
    computes the class's own forward: flattened, with fast_decode's fp32 patch over it too."""
    import torch
    from lavis.models.vit import VisionTransformerEncoder

    from captioner import fast_decode
    from captioner.flat_encoder import FlatViT

    wrapped = VisionTransformerEncoder(
        img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4,
        use_grad_checkpointing=True, ckpt_layer=1,
    ).eval()  # fmt: skip
    wrapped.load_state_dict(small_vit.state_dict())
    assert "forward" in wrapped.blocks[1].attn.__dict__  # the wrapper is there
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = modules_one_per_call(small_vit, images)
        assert torch.equal(modules_one_per_call(wrapped, images), expected)
        for patched in (False, True):
            if patched:
                fast_decode.optimize_model(wrapped)
            flat = FlatViT.build(wrapped)
            assert flat is not None
            assert torch.equal(flat.forward(images, flat.split()), expected)
    assert FlatViT.build(wrapped, low_precision=True) is None


def test_fast_decode_patch_flattened_only_in_fp32(small_vit: Any) -> None:
    """fast_decode.optimize_model patches every ViT attention; in fp32 the patch runs LAVIS's
    own code, so the flat form stands in for it; in bf16/fp16 it runs its own kernel: modules."""
    import torch

    from captioner import fast_decode
    from captioner.flat_encoder import FlatViT

    vit = copy.deepcopy(small_vit)
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = modules_one_per_call(vit, images)
        assert fast_decode.optimize_model(vit) == 2
        flat = FlatViT.build(vit)
        assert flat is not None
        assert torch.equal(flat.forward(images, flat.split()), expected)
    assert FlatViT.build(vit, low_precision=True) is None
    vit.blocks[0].attn.__dict__["_fast_decode_saved_forward"] = lambda x, register_hook=False: x
    assert FlatViT.build(vit) is None  # patched over another patch: not LAVIS's code
