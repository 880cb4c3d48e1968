"""captioner/fast_decode.py on real architectures: stock LAVIS's exact tokens from the full-size
blip_caption/large_coco (ViT-L, 12-layer BERT, seeded random weights) and exact captions from the
project's trained tiny-shapes model.

Stock and fast run in one process on one model object; the encoder option round-trips on the
real ViT-L, whose last blocks carry LAVIS's checkpoint wrappers. The option matrix on a small
random model is in test_fast_decode.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from fast_decode_helpers import assert_same, both, gen_kwargs, prompt_ids
from fast_decode_helpers import one_thread as one_thread  # a fixture, imported for pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def large_coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Full-size blip_caption/large_coco with seeded random weights and one encoded image."""
    import torch

    import blip2_model

    model_dir = tmp_path_factory.mktemp("large_coco")
    blip2_model.write_placeholder_tokenizer(model_dir / blip2_model.TOKENIZER_DIRNAME)
    spec = blip2_model.lavis_spec("blip_caption", "large_coco", model_dir)
    torch.manual_seed(0)
    model = blip2_model.build_model(spec).eval()
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size)
    with torch.inference_mode():
        embeds = model.forward_encoder({"image": pixels})
    return {"model": model, "spec": spec, "embeds": embeds, "pixels": pixels}


# --------------------------------------------------------------------------- full-size large_coco


def test_large_coco_random_weights_identical(large_coco: dict) -> None:
    """The real architecture (ViT-L, 12-layer BERT, 30524-token vocab), beams 3 and greedy."""
    model, embeds = large_coco["model"], large_coco["embeds"]
    prompt = prompt_ids(model, large_coco["spec"].prompt, 1)
    for kw in (
        gen_kwargs(model, num_beams=3, num_return_sequences=2, min_length=9, max_length=9),
        gen_kwargs(model, num_beams=1, min_length=9, max_length=9, repetition_penalty=1.2),
    ):
        stock, fast = both(model, prompt, embeds, **kw)
        assert stock.shape[1] == 9
        assert_same(model, stock, fast)


def test_large_coco_optimize_model_round_trip(large_coco: dict) -> None:
    """On the real ViT-L (whose last blocks carry LAVIS's checkpoint wrappers): fp32 encoder
    output unchanged while optimized, and restore_model puts LAVIS's own forwards back."""
    import torch

    from captioner import fast_decode

    model = large_coco["model"]
    blocks = model.visual_encoder.blocks
    before = [b.attn.__dict__.get("forward") for b in blocks]
    assert any(f is not None for f in before)  # the checkpoint-wrapped blocks
    try:
        assert fast_decode.optimize_model(model) == len(blocks)
        pixels = large_coco["pixels"]
        with torch.inference_mode():
            assert torch.equal(model.forward_encoder({"image": pixels}), large_coco["embeds"])
    finally:
        fast_decode.restore_model(model)
    assert [b.attn.__dict__.get("forward") for b in blocks] == before


# --------------------------------------------------------------------------- tiny-shapes model


@pytest.mark.skipif(not TINY_YAML.is_file(), reason=f"tiny-shapes model absent: {TINY_YAML}")
def test_tiny_shapes_captions_identical(tiny_captioner: Any) -> None:
    """The project's trained tiny model: real captions, stock vs fast, several option sets."""
    import torch

    import blip2_model
    import tiny_shapes

    rng = random.Random(2024)
    images = [tiny_shapes.sample(rng)[0] for _ in range(6)]
    fast = blip2_model.Captioner(tiny_captioner.model, tiny_captioner.spec, decode="fast")
    stock = blip2_model.Captioner(tiny_captioner.model, tiny_captioner.spec, decode="stock")
    for opts in (
        blip2_model.GenerationOptions(),
        blip2_model.GenerationOptions(num_beams=4, num_captions=3, max_length=20),
        blip2_model.GenerationOptions(num_beams=1, repetition_penalty=1.5),
    ):
        expected = stock.caption(images, opts)
        assert fast.caption(images, opts) == expected
    assert any(c[0] for c in expected)
    sampling = blip2_model.GenerationOptions(use_nucleus_sampling=True, num_captions=2)
    torch.manual_seed(5)
    expected = stock.caption(images, sampling)
    torch.manual_seed(5)
    assert fast.caption(images, sampling) == expected
