"""Shared by the fast decoder tests (tests/test_fast_decode*.py, tests/test_flat_decoder.py):
stock and fast decoding of the same inputs and their comparison, and the module-scoped autouse
fixture `one_thread` (a test module imports it by name so pytest applies it there)."""

from __future__ import annotations

from typing import Any

import pytest

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Run this module on one intra-op thread, restored afterwards.

    The CI machine's 2 cores are shared: with 2 OpenMP threads every small op waits for a
    descheduled peer and the small-model tests run ~80x slower. Stock and fast always run under
    the same setting, so the comparisons are unaffected.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers


def stock_forward(dec: Any, ids: Any, repeated: Any) -> Any:
    """One stock LAVIS decoder pass over image embeddings already repeated per beam."""
    import torch

    return dec(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        encoder_hidden_states=repeated,
        encoder_attention_mask=torch.ones(repeated.shape[:-1], dtype=torch.long),
        return_dict=True,
        is_decoder=True,
    )


def prompt_ids(model: Any, text: str, rows: int) -> Any:
    """What Captioner._prompt_ids makes: [DEC] + prompt tokens, final [SEP] dropped."""
    ids = model.tokenizer([text] * rows, return_tensors="pt").input_ids
    ids[:, 0] = model.tokenizer.bos_token_id
    return ids[:, :-1]


def gen_kwargs(model: Any, **kw: Any) -> dict[str, Any]:
    tok = model.tokenizer
    base = {
        "max_length": 20,
        "min_length": 5,
        "eos_token_id": tok.sep_token_id,
        "pad_token_id": tok.pad_token_id,
        "repetition_penalty": 1.0,
    }
    base.update(kw)
    if not base.get("do_sample"):
        base.setdefault("num_beams", 3)
        base.setdefault("num_return_sequences", 1)
    return base


def both(model: Any, prompt: Any, embeds: Any, seed: int | None = None, **kw: Any) -> tuple:
    """(stock ids, fast ids) for the same inputs, each from the same RNG state if seeded."""
    import torch

    import blip2_model
    from captioner import fast_decode

    outs = []
    for fn in (blip2_model.stock_generate, fast_decode.generate):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            outs.append(fn(model.text_decoder, prompt, embeds, **kw))
    return outs[0], outs[1]


def assert_same(model: Any, stock: Any, fast: Any) -> None:
    assert stock.shape == fast.shape
    assert stock.tolist() == fast.tolist()
    decode = model.tokenizer.batch_decode
    assert decode(stock, skip_special_tokens=True) == decode(fast, skip_special_tokens=True)
