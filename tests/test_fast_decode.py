"""captioner/fast_decode.py: decoding with per-image cross-attention K/V gives stock LAVIS's
exact tokens.

A small randomly initialised BLIP (real LAVIS modules, no mocks) runs the option matrix: beams,
returned sequences, lengths, repetition penalty, nucleus sampling, a longer prompt, one step bit
for bit, K/V projected once per image, the Captioner integration, the bf16 paths and the encoder
option. Stock and fast run in one process on one model object, so these tests also show that the
fast path leaves the stock path untouched. The full-size large_coco architecture and the trained
tiny-shapes model are in test_fast_decode_models.py.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest

from fast_decode_helpers import assert_same, both, gen_kwargs, prompt_ids, stock_forward
from fast_decode_helpers import one_thread as one_thread  # a fixture, imported for pytest

ROOT = Path(__file__).resolve().parent.parent

SMALL_IMAGE = 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small random BLIP (ViT 2x64, BERT 2x64) and the embeddings of 4 random images."""
    import torch

    import blip2_model

    tok_dir = blip2_model.write_placeholder_tokenizer(
        tmp_path_factory.mktemp("small") / "vocab", vocab_size=400
    )
    spec = blip2_model.ModelSpec(
        name="small-random",
        image_size=SMALL_IMAGE,
        tokenizer_dir=tok_dir,
        checkpoint=None,
        vit={"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4},
        text_decoder={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
        },
    )
    torch.manual_seed(1234)
    model = blip2_model.build_model(spec).eval()
    # At init scale the cross-attention barely reaches the logits and every image decodes to
    # the same caption; amplify it so captions depend on the image (checked below).
    with torch.no_grad():
        for name, weight in model.text_decoder.named_parameters():
            if "crossattention" in name and weight.dim() == 2:
                weight.mul_(5.0)
    pixels = torch.randn(4, 3, SMALL_IMAGE, SMALL_IMAGE, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        embeds = model.forward_encoder({"image": pixels})
    return {"model": model, "spec": spec, "embeds": embeds, "pixels": pixels}


# --------------------------------------------------------------------------- small random model

BEAM_CASES = [
    # num_beams, num_return_sequences, min_length, max_length, repetition_penalty
    (1, 1, 0, 12, 1.0),
    (1, 1, 10, 10, 1.5),
    (3, 1, 5, 20, 1.0),
    (3, 3, 5, 20, 1.0),
    (3, 2, 20, 20, 1.3),
    (5, 1, 0, 8, 1.0),
    (5, 4, 6, 16, 2.0),
]


@pytest.mark.parametrize("beams,returns,min_len,max_len,penalty", BEAM_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_beam_and_greedy_ids_identical(
    small: dict, batch: int, beams: int, returns: int, min_len: int, max_len: int, penalty: float
) -> None:
    model, embeds = small["model"], small["embeds"][:batch]
    kw = gen_kwargs(
        model,
        num_beams=beams,
        num_return_sequences=returns,
        min_length=min_len,
        max_length=max_len,
        repetition_penalty=penalty,
    )
    stock, fast = both(model, prompt_ids(model, small["spec"].prompt, batch), embeds, **kw)
    assert stock.shape[0] == batch * returns
    assert_same(model, stock, fast)


def test_captions_depend_on_the_image(small: dict) -> None:
    """Guards the other tests: identical outputs would prove little if every image decoded alike."""
    model = small["model"]
    kw = gen_kwargs(model, num_beams=3)
    stock, fast = both(model, prompt_ids(model, small["spec"].prompt, 4), small["embeds"], **kw)
    assert_same(model, stock, fast)
    assert len({tuple(row) for row in stock.tolist()}) >= 3


def test_matches_lavis_own_generate(small: dict) -> None:
    """Against LAVIS's `BlipCaption.generate` itself, the reference service's call."""
    import torch

    from captioner import fast_decode

    model, spec, pixels = small["model"], small["spec"], small["pixels"]
    with torch.no_grad():
        expected = model.generate({"image": pixels}, num_beams=3, max_length=20, min_length=5)
    with torch.inference_mode():
        embeds = model.forward_encoder({"image": pixels})
        out = fast_decode.generate(
            model.text_decoder,
            prompt_ids(model, spec.prompt, len(pixels)),
            embeds,
            **gen_kwargs(model, num_beams=3, max_length=20, min_length=5),
        )
    texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
    assert [t[len(spec.prompt) :] for t in texts] == expected


@pytest.mark.parametrize("beams", [1, 4])
def test_longer_prompt(small: dict, beams: int) -> None:
    model = small["model"]
    text = small["spec"].prompt + "b c w7 w12 of a w3 "
    prompt = prompt_ids(model, text, 2)
    assert prompt.shape[1] > 8
    kw = gen_kwargs(model, num_beams=beams, num_return_sequences=1, max_length=24)
    assert_same(model, *both(model, prompt, small["embeds"][:2], **kw))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nucleus_sampling_identical_with_same_seed(small: dict, seed: int) -> None:
    """Same HF sampling loop, same logits, same RNG draws: the same samples as stock."""
    model = small["model"]
    kw = gen_kwargs(
        model, do_sample=True, top_p=0.9, num_return_sequences=1, repetition_penalty=1.1
    )
    stock, fast = both(
        model, prompt_ids(model, small["spec"].prompt, 4), small["embeds"], seed=seed, **kw
    )
    assert_same(model, stock, fast)


def test_sampling_several_per_image_without_repeating_embeddings(small: dict) -> None:
    """For n samples per image, fast can take each image once with num_return_sequences=n
    (stock needs the embeddings repeated n times): same rows, same RNG draws, same ids."""
    import torch

    import blip2_model
    from captioner import fast_decode

    model, embeds, n = small["model"], small["embeds"][:3], 3
    kw = gen_kwargs(model, do_sample=True, top_p=0.9, repetition_penalty=1.2)
    with torch.inference_mode():
        torch.manual_seed(21)
        stock = blip2_model.stock_generate(
            model.text_decoder,
            prompt_ids(model, small["spec"].prompt, 3 * n),
            embeds.repeat_interleave(n, 0),
            num_return_sequences=1,
            **kw,
        )
        torch.manual_seed(21)
        fast = fast_decode.generate(
            model.text_decoder,
            prompt_ids(model, small["spec"].prompt, 3),
            embeds,
            num_return_sequences=n,
            **kw,
        )
    assert_same(model, stock, fast)


def test_step_logits_and_cache_bit_identical(small: dict) -> None:
    """One decoder step through both paths, compared bit for bit (not just argmax)."""
    import torch

    from captioner import fast_decode

    model, embeds = small["model"], small["embeds"][:2]
    dec = model.text_decoder
    beams = 3
    ids = prompt_ids(model, small["spec"].prompt + "b c ", 2).repeat_interleave(beams, 0)
    with torch.inference_mode():
        repeated = embeds.repeat_interleave(beams, 0)
        stock = stock_forward(dec, ids, repeated)
        lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        fast = lm(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert torch.equal(stock.logits, fast.logits)
        for stock_layer, fast_layer in zip(
            stock.past_key_values, fast.past_key_values, strict=True
        ):
            assert all(torch.equal(a, b) for a, b in zip(stock_layer, fast_layer, strict=True))
        # ... and a cached single-token step after reordering beams, as beam search does.
        order = torch.tensor([2, 0, 1, 3, 3, 5])
        nxt = torch.tensor([[9], [10], [11], [12], [13], [14]])
        mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        stock2 = dec(
            input_ids=nxt,
            attention_mask=mask,
            past_key_values=dec._reorder_cache(stock.past_key_values, order),
            encoder_hidden_states=repeated,
            encoder_attention_mask=torch.ones(repeated.shape[:-1], dtype=torch.long),
            return_dict=True,
            is_decoder=True,
        )
        fast2 = lm(
            input_ids=nxt, attention_mask=mask, past=lm._reorder_cache(fast.past_key_values, order)
        )
        assert torch.equal(stock2.logits, fast2.logits)


def test_image_keys_values_projected_once_per_image(small: dict) -> None:
    """The point of the module: K/V projections run once per image, not per beam or step."""
    import torch

    import blip2_model
    from captioner import fast_decode

    model, embeds = small["model"], small["embeds"][:2]
    calls: list[int] = []
    hooks = [
        proj.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
        for layer in model.text_decoder.bert.encoder.layer
        for proj in (layer.crossattention.self.key, layer.crossattention.self.value)
    ]
    try:
        kw = gen_kwargs(model, num_beams=4, min_length=15, max_length=15)
        prompt = prompt_ids(model, small["spec"].prompt, 2)
        with torch.inference_mode():
            fast_decode.generate(model.text_decoder, prompt, embeds, **kw)
            fast_calls = list(calls)
            calls.clear()
            blip2_model.stock_generate(model.text_decoder, prompt, embeds, **kw)
    finally:
        for hook in hooks:
            hook.remove()
    layers = len(model.text_decoder.bert.encoder.layer)
    assert fast_calls == [2] * (2 * layers)  # one call per projection, one row per image
    assert len(calls) > 10 * len(fast_calls) and set(calls) == {8}  # stock: every step, per beam


def test_fast_path_through_captioner(small: dict) -> None:
    """The lead's integration point: Captioner(decode="fast") captions exactly like stock."""
    from PIL import Image

    import blip2_model

    model, spec = small["model"], small["spec"]
    stock = blip2_model.Captioner(model, spec, decode="stock")
    fast = blip2_model.Captioner(model, spec, decode="fast")
    rng = random.Random(3)
    images = [
        Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))) for _ in range(3)
    ]
    options = [
        blip2_model.GenerationOptions(),
        blip2_model.GenerationOptions(num_beams=5, num_captions=3, repetition_penalty=1.4),
        blip2_model.GenerationOptions(num_beams=1, min_length=3, max_length=9, prompt="b c"),
    ]
    for opts in options:
        assert fast.caption(images, opts) == stock.caption(images, opts)
    sampling = blip2_model.GenerationOptions(use_nucleus_sampling=True, num_captions=2)
    import torch

    torch.manual_seed(11)
    sampled_stock = stock.caption(images, sampling)
    torch.manual_seed(11)
    assert fast.caption(images, sampling) == sampled_stock


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_bf16_autocast_runs(small: dict, mode: str) -> None:
    """Under bf16 autocast the fast path works (ids are not required to equal fp32's)."""
    import torch

    from captioner import fast_decode

    model = small["model"]
    kw = gen_kwargs(model, num_beams=3, num_return_sequences=2)
    prompt = prompt_ids(model, small["spec"].prompt, 2)
    grad_ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with grad_ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        embeds = model.forward_encoder({"image": small["pixels"][:2]})
        out = fast_decode.generate(model.text_decoder, prompt, embeds, **kw)
    assert out.dtype == torch.long and out.shape[0] == 4 and out.shape[1] <= 20
    assert torch.equal(out[:, : prompt.shape[1]], prompt.repeat_interleave(2, 0))


@pytest.mark.parametrize("attention", ["fused", "matmul"])
def test_bf16_step_close_to_stock_bf16(small: dict, attention: str) -> None:
    """The low-precision path computes the same function as stock under bf16 autocast, with
    either attention kernel (cpu_attention)."""
    import torch

    from captioner import fast_decode

    model, embeds = small["model"], small["embeds"][:2]
    dec = model.text_decoder
    ids = prompt_ids(model, small["spec"].prompt, 2).repeat_interleave(3, 0)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        repeated = embeds.repeat_interleave(3, 0)
        stock = stock_forward(dec, ids, repeated).logits.float()
        cache = fast_decode.CrossAttentionCache.build(dec, embeds)
        lm = fast_decode._lm_class()(dec, cache, attention)
        fast = lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        assert lm.cache.layout == "heads"  # the low-precision path ran
    exact = dec(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        encoder_hidden_states=embeds.repeat_interleave(3, 0),
        encoder_attention_mask=torch.ones((6, embeds.shape[1]), dtype=torch.long),
        return_dict=True,
        is_decoder=True,
    ).logits
    # bf16 noise of the fast path is of the order of stock bf16's own.
    assert (fast - exact).abs().max() <= 2 * (stock - exact).abs().max() + 1e-3


def test_bf16_weights_without_autocast(small: dict) -> None:
    """A model converted to bf16 (no autocast) also decodes, through the fused path."""
    import copy

    import torch

    from captioner import fast_decode

    model = copy.deepcopy(small["model"]).to(torch.bfloat16)
    kw = gen_kwargs(model, num_beams=3, num_return_sequences=2, max_length=14)
    prompt = prompt_ids(model, small["spec"].prompt, 2)
    with torch.inference_mode():
        embeds = model.forward_encoder({"image": small["pixels"][:2].to(torch.bfloat16)})
        out = fast_decode.generate(model.text_decoder, prompt, embeds, **kw)
    assert out.shape[0] == 4 and out.shape[1] <= 14


def test_rejects_repeated_embeddings(small: dict) -> None:
    import torch

    from captioner import fast_decode

    model = small["model"]
    with pytest.raises(ValueError, match="rows"), torch.inference_mode():
        fast_decode.generate(
            model.text_decoder,
            prompt_ids(model, small["spec"].prompt, 2),
            small["embeds"][:1],
            **gen_kwargs(model),
        )


# --------------------------------------------------------------------------- encoder option


@pytest.mark.parametrize("attention", ["fused", "matmul"])
def test_optimize_model_keeps_fp32_and_is_reversible(small: dict, attention: str) -> None:
    import torch

    from captioner import fast_decode

    model, pixels = small["model"], small["pixels"]
    with torch.inference_mode():
        before = model.forward_encoder({"image": pixels})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before_bf16 = model.forward_encoder({"image": pixels})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        assert fast_decode.optimize_model(model, attention) == 2
        assert fast_decode.optimize_model(model, attention) == 2  # idempotent
        blocks = model.visual_encoder.blocks
        assert {b.attn._fast_decode_attention for b in blocks} == {attention}
        with torch.inference_mode():
            assert torch.equal(model.forward_encoder({"image": pixels}), before)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fused = model.forward_encoder({"image": pixels})
        # Either attention in bf16 is about as close to fp32 as LAVIS's own bf16 maths.
        err_fused = (fused.float() - before).abs().max().item()
        err_stock = (before_bf16.float() - before).abs().max().item()
        assert err_fused <= 2 * err_stock + 1e-3
    finally:
        fast_decode.restore_model(model)
    assert all("forward" not in b.attn.__dict__ for b in model.visual_encoder.blocks)
    assert all("_fast_decode_attention" not in b.attn.__dict__ for b in blocks)
    assert model.state_dict().keys() == state.keys()
    with torch.inference_mode():
        assert torch.equal(model.forward_encoder({"image": pixels}), before)


def test_import_is_light() -> None:
    """No torch/LAVIS import at module import time (the service imports it lazily anyway)."""
    import subprocess

    code = (
        "import sys, captioner.fast_decode; print('torch' in sys.modules, 'lavis' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
