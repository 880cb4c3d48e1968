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


def planned_flat(vit: Any, images: Any) -> Any:
    """The flat ViT's embeddings at the split the planner allows here (both must exist)."""
    from captioner.flat_encoder import FlatViT, SplitPlanner

    flat = FlatViT.build(vit)
    assert flat is not None
    split = SplitPlanner().plan(flat, len(images))
    assert split is not None
    return flat.forward(images, split)


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


@pytest.mark.parametrize("count", [1, 2, 5])
def test_planned_flat_vit_is_the_modules_bit_for_bit(
    tiny_captioner: Any, pixels: Any, count: int
) -> None:
    """What the planner allows for 1, 2 and 5 images on this machine's kernels gives the
    modules' embeddings, one image per call, bit for bit."""
    import torch

    from captioner.flat_encoder import FlatViT, SplitPlanner

    vit = tiny_captioner.model.visual_encoder
    flat = FlatViT.build(vit)
    assert flat is not None  # the tiny model is a plain LAVIS ViT
    assert not any(b.queries_first for b in flat.blocks)  # 32 ** -0.5 is not a power of two
    split = SplitPlanner().plan(flat, count)
    assert split is not None  # the flat block is the modules' here
    with torch.inference_mode():
        got = flat.forward(pixels[:count], split)
        assert torch.equal(got, modules_one_per_call(vit, pixels[:count]))
    assert count == 1 or not torch.equal(got[0], got[1])  # images differ: a real check


@pytest.mark.parametrize(("rows", "maps"), SPLITS)
def test_forced_splits_keep_images_in_order(
    tiny_captioner: Any, pixels: Any, rows: int, maps: int
) -> None:
    """Any split, checked or not, computes each image's own embedding in its place (chunks,
    attention groups and their remainders): equal to one image per call within rounding."""
    import torch

    from captioner.flat_encoder import FlatViT, Split

    vit = tiny_captioner.model.visual_encoder
    flat = FlatViT.build(vit)
    assert flat is not None
    with torch.inference_mode():
        got = flat.forward(pixels, Split(rows, maps))
        expected = modules_one_per_call(vit, pixels)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(got[1:], expected[:-1], rtol=0, atol=1e-2)


def test_wanted_sizes_and_planner(tiny_captioner: Any) -> None:
    """ViT-L/16 at 384 px: two images per linear call, one per map; the tiny model: the batch
    in both. Every call size above one image is checked, remainders included, and any that
    differs from one image per call (stand-ins for a kernel that splits rows differently: an
    activation or a patch embedding whose result depends on the images in the call) gives one
    image per call. A flat block
    that is not the modules' (queries-first forced where the scale is 1/sqrt(32)) runs the
    modules."""
    import dataclasses

    import torch

    from captioner.flat_encoder import FlatViT, Split, SplitPlanner

    flat = FlatViT.build(tiny_captioner.model.visual_encoder)
    assert flat is not None
    large = dataclasses.replace(
        flat,
        pos_embed=torch.zeros(1, 577, 1024),
        blocks=(dataclasses.replace(flat.blocks[0], heads=16),),
    )
    assert large.wanted(8) == Split(rows=2, maps=1)
    assert large.wanted(1) == Split(rows=1, maps=1)
    assert flat.wanted(8) == Split(rows=8, maps=8)
    assert flat.wanted(100) == Split(rows=34, maps=34)
    assert FlatViT.sizes(7, Split(2, 1)) == {("rows", 2)}
    assert FlatViT.sizes(1, Split(1, 1)) == set()
    assert FlatViT.sizes(100, Split(34, 8)) == {
        ("rows", 34),
        ("rows", 32),
        ("maps", 8),
        ("maps", 2),
    }
    act = flat.blocks[0].act

    def act_by_count(x: Any) -> Any:  # one image: the modules' GELU; more: not quite
        return act(x) * (1 + (len(x) - 1) / 1e4)

    by_count = dataclasses.replace(
        flat, blocks=(dataclasses.replace(flat.blocks[0], act=act_by_count),)
    )
    assert by_count.matches_modules() and by_count.agrees("maps", 3)
    assert not by_count.agrees("rows", 3)
    assert SplitPlanner().plan(by_count, 1) == Split()
    assert SplitPlanner().plan(by_count, 8) == Split()
    embed = flat.patch_embed
    embed_by_count = dataclasses.replace(flat, patch_embed=lambda x: embed(x) + (len(x) - 1))
    assert not embed_by_count.agrees("rows", 2)
    assert SplitPlanner().plan(embed_by_count, 8) == Split()
    forced = dataclasses.replace(
        flat, blocks=tuple(dataclasses.replace(b, queries_first=True) for b in flat.blocks)
    )
    assert not forced.matches_modules()
    assert SplitPlanner().plan(forced, 8) is None
    assert flat.matches_modules()


def test_queries_first_only_where_it_is_exact(small_vit: Any, pixels: Any) -> None:
    """Head size 16: the scale 1/4 goes on the queries, and the embeddings are the modules' bit
    for bit (whatever split the planner allows here: with 10 tokens per image MKL's products
    can differ between 10 and 30 rows). In fp16 it does not (x/4 can fall below fp16's normal
    numbers)."""
    import copy

    import torch
    import torch.nn.functional as F

    from captioner.flat_encoder import FlatViT, SplitPlanner

    images = F.interpolate(pixels, size=(48, 48), mode="bilinear", align_corners=False)
    flat = FlatViT.build(small_vit)
    assert flat is not None and all(b.queries_first for b in flat.blocks)
    assert flat.matches_modules()
    split = SplitPlanner().plan(flat, len(images))
    assert split is not None
    with torch.inference_mode():
        got = flat.forward(images, split)
        assert torch.equal(got, modules_one_per_call(small_vit, images))
    half = FlatViT.build(copy.deepcopy(small_vit).half())
    assert half is not None and not any(b.queries_first for b in half.blocks)


def test_captioner_encodes_through_the_flat_vit(tiny_captioner: Any, pixels: Any) -> None:
    """fp32 on a CPU: `encode` takes the flat path (its maps are materialised) and gives the
    modules' embeddings; with a forward hook on the ViT it runs the modules, and the hook fires."""
    import torch

    vit = tiny_captioner.model.visual_encoder
    assert tiny_captioner.maps_on_cpu and tiny_captioner._lavis_encoder
    calls: list[int] = []
    with torch.inference_mode():
        expected = modules_one_per_call(vit, pixels)
        assert torch.equal(tiny_captioner.encode(pixels), expected)
        assert tiny_captioner._vit_planner._known  # the planner was asked
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


def _own_forward_features(v: Any) -> None:
    v.forward_features = lambda x, register_blk=-1: x


NOT_PLAIN = [_training, _hook, _pre_hook, _patched_forward, _linear_subclass, _own_forward_features]
NOT_PLAIN += [_block_subclass, _other_norm, _checkpoint_over_other_code]


@pytest.mark.parametrize("change", NOT_PLAIN, ids=lambda f: f.__name__.strip("_"))
def test_not_plain_runs_the_modules(small_vit: Any, change: Any) -> None:
    from captioner.flat_encoder import FlatViT

    assert FlatViT.build(small_vit) is not None
    vit = copy.deepcopy(small_vit)
    change(vit)
    assert FlatViT.build(vit) is None


def test_classes_patched_in_place_run_the_modules(small_vit: Any, monkeypatch: Any) -> None:
    from lavis.models.vit import Attention, Mlp

    from captioner.flat_encoder import FlatViT

    monkeypatch.setattr(Attention, "forward", lambda self, x, register_hook=False: x)
    assert FlatViT.build(small_vit) is None
    monkeypatch.undo()
    assert FlatViT.build(small_vit) is not None
    monkeypatch.setattr(Mlp, "forward", lambda self, x: x)
    assert FlatViT.build(small_vit) is None


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
            assert torch.equal(planned_flat(wrapped, images), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FlatViT.build(wrapped) is None  # fast_decode's own kernel under autocast


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
        assert torch.equal(planned_flat(vit, images), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert FlatViT.build(vit) is None
    assert FlatViT.build(copy.deepcopy(vit).to(torch.bfloat16)) is None
    over = copy.deepcopy(vit)
    over.blocks[0].attn.forward = lambda x, register_hook=False: x
    assert FlatViT.build(over) is None  # set over fast_decode's patch
    vit.blocks[0].attn.__dict__["_fast_decode_saved_forward"] = lambda x, register_hook=False: x
    assert FlatViT.build(vit) is None  # patched over another patch: not LAVIS's code
