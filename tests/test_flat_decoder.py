"""captioner/flat_decoder.py: the decoder step as plain tensor calls gives the logits and the
key/value cache of LAVIS's own modules bit for bit, and is used only for a decoder it can
flatten. The project's trained tiny model throughout (real LAVIS modules, real weights)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from fast_decode_helpers import stock_forward


@pytest.fixture(scope="module")
def decoding(tiny_captioner: Any) -> dict[str, Any]:
    """The tiny model's decoder, 3 encoded images and their 3-beam prompt rows."""
    import torch

    import tiny_shapes
    from captioning.options import GenerationOptions

    rng = random.Random(77)
    captioner = tiny_captioner
    pixels = torch.stack([captioner.prepare(tiny_shapes.sample(rng)[0]) for _ in range(3)])
    with torch.inference_mode():
        embeds = captioner.encode(pixels)
    opts = captioner.check_options(GenerationOptions())
    ids = captioner._prompt_ids(captioner._prompt_text(opts), 3).repeat_interleave(3, 0)
    return {"decoder": captioner.model.text_decoder, "embeds": embeds, "ids": ids}


def two_steps(lm: Any, ids: Any) -> list[Any]:
    """The prompt step, then a cached one-token step after a beam reorder, as beam search runs."""
    import torch

    first = lm(input_ids=ids, attention_mask=torch.ones_like(ids))
    order = torch.tensor([2, 0, 1, 3, 3, 5, 8, 6, 7])
    nxt = torch.arange(20, 20 + ids.shape[0]).view(-1, 1)
    mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
    second = lm(
        input_ids=nxt, attention_mask=mask, past=lm._reorder_cache(first.past_key_values, order)
    )
    return [first, second]


def test_flat_step_is_the_modules_bit_for_bit(decoding: dict) -> None:
    import torch

    from captioner import fast_decode

    dec, embeds = decoding["decoder"], decoding["embeds"]
    with torch.inference_mode():
        flat_lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        module_lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        assert flat_lm.flat is not None  # the tiny model is a plain LAVIS decoder
        module_lm.flat = None  # through LAVIS's modules
        flat, modules = two_steps(flat_lm, decoding["ids"]), two_steps(module_lm, decoding["ids"])
    for a, b in zip(flat, modules, strict=True):
        assert torch.equal(a.logits, b.logits)
        for layer_a, layer_b in zip(a.past_key_values, b.past_key_values, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(layer_a, layer_b, strict=True))
    assert not torch.equal(flat[0].logits[0], flat[0].logits[3])  # images differ: a real check


def test_flat_step_is_stock_lavis(decoding: dict) -> None:
    """Against LAVIS's decoder on the embeddings repeated per beam (what stock generate runs)."""
    import torch

    from captioner import fast_decode

    dec, embeds, ids = decoding["decoder"], decoding["embeds"], decoding["ids"]
    with torch.inference_mode():
        stock = stock_forward(dec, ids, embeds.repeat_interleave(3, 0))
        lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        flat = lm(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert lm.flat is not None
    assert torch.equal(stock.logits, flat.logits)


def _training(dec: Any) -> None:
    dec.train()


def _chunked(dec: Any) -> None:
    dec.bert.encoder.layer[1].chunk_size_feed_forward = 4


def _relative_positions(dec: Any) -> None:
    dec.bert.encoder.layer[0].attention.self.position_embedding_type = "relative_key"


def _relative_embeddings(dec: Any) -> None:
    dec.bert.embeddings.position_embedding_type = "relative_key"


def _max_norm(dec: Any) -> None:
    dec.bert.embeddings.word_embeddings.max_norm = 1.0


def _patched_linear(dec: Any) -> None:
    """What packed_linear.pack_model does to a bf16 model: an instance forward."""
    linear = dec.bert.encoder.layer[0].intermediate.dense
    linear.forward = linear.forward


def _dropout_on_in_one_layer(dec: Any) -> None:
    dec.bert.encoder.layer[1].output.dropout.train()


def _hooked(dec: Any) -> None:
    """A forward hook (a user's, or a tool's) would never see a flat step."""
    dec.bert.encoder.layer[0].output.LayerNorm.register_forward_hook(lambda *args: None)


def _layer_norm_subclass(dec: Any) -> None:
    """A LayerNorm variant (fused, LoRA-wrapped, ...) computes more than F.layer_norm."""
    import torch

    class Variant(torch.nn.LayerNorm):
        pass

    old = dec.cls.predictions.transform.LayerNorm
    variant = Variant(old.normalized_shape, eps=old.eps)
    variant.load_state_dict(old.state_dict())
    dec.cls.predictions.transform.LayerNorm = variant.eval()


@pytest.mark.parametrize(
    "change",
    [
        _training,
        _chunked,
        _relative_positions,
        _relative_embeddings,
        _max_norm,
        _patched_linear,
        _dropout_on_in_one_layer,
        _hooked,
        _layer_norm_subclass,
    ],
)
def test_only_a_plain_decoder_is_flattened(decoding: dict, change: Callable[[Any], None]) -> None:
    import copy

    from captioner.flat_decoder import FlatDecoder

    dec = copy.deepcopy(decoding["decoder"])  # the session's tiny model stays as it is
    assert FlatDecoder.build(dec) is not None
    change(dec)
    assert FlatDecoder.build(dec) is None


def test_packed_bf16_decoder_runs_its_modules(tiny_captioner: Any) -> None:
    """A bf16 decoder with packed oneDNN linear layers keeps them: the flat step would bypass
    the packed products, so fast decoding goes through the modules."""
    import copy

    import torch

    from captioner import packed_linear
    from captioner.flat_decoder import FlatDecoder

    if not packed_linear.available(torch.bfloat16, "cpu"):
        pytest.skip("this torch build has no oneDNN packed bf16 linear")
    dec = copy.deepcopy(tiny_captioner.model.text_decoder).to(torch.bfloat16)
    assert FlatDecoder.build(dec) is not None
    assert packed_linear.pack_model(dec) > 0
    assert FlatDecoder.build(dec) is None
    packed_linear.unpack_model(dec)
    assert FlatDecoder.build(dec) is not None


def test_pruned_self_attention_heads(decoding: dict) -> None:
    """LAVIS prunes the self-attention only (`config.pruned_heads`): the cross-attention keeps
    all its heads, and the flat step splits each with its own layout."""
    import copy

    import torch

    from captioner import fast_decode

    dec = copy.deepcopy(decoding["decoder"])
    dec.bert.encoder.layer[0].attention.prune_heads([1])
    dec.eval()  # the pruned projections are new modules, built in training mode
    assert dec.bert.encoder.layer[0].attention.self.num_attention_heads == 3
    embeds = decoding["embeds"]
    with torch.inference_mode():
        flat_lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        module_lm = fast_decode._lm_class()(dec, fast_decode.CrossAttentionCache.build(dec, embeds))
        assert flat_lm.flat is not None
        module_lm.flat = None
        flat, modules = two_steps(flat_lm, decoding["ids"]), two_steps(module_lm, decoding["ids"])
    for a, b in zip(flat, modules, strict=True):
        assert torch.equal(a.logits, b.logits)


def test_fast_decoding_refuses_dropout_anywhere(decoding: dict) -> None:
    """Neither step applies dropout, so a decoder with any module in training mode is refused
    rather than decoded without the dropout it asked for."""
    import copy

    import torch

    from captioner import fast_decode

    dec = copy.deepcopy(decoding["decoder"])
    dec.bert.encoder.layer[0].attention.self.dropout.train()
    with torch.inference_mode(), pytest.raises(ValueError, match="eval mode"):
        fast_decode.generate(dec, decoding["ids"][::3], decoding["embeds"], max_length=12)
