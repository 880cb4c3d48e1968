"""Token ids to text as `batch_decode(ids, skip_special_tokens=True)` gives it, minus its waste.

Hugging Face's Python ("slow") tokenizers, which LAVIS loads for BLIP (BertTokenizer) and BLIP-2
OPT (GPT2Tokenizer), rebuild the list of special ids for every token they check
(`all_special_ids` is a property that walks the special-token map each time, transformers
4.25): 1.9 ms for a batch of 8 tiny-model captions, in the model thread between batches,
against 0.14 ms with the ids read once (the Intel Xeon of docs/performance.md). Removing those
ids first and decoding the rest with `skip_special_tokens=False` gives the same text: skipping
is the only use the slow decoder makes of the list (its second check compares token strings with
ids and never matches). Rust ("fast") tokenizers skip natively, and tokenizers with a decoder
of their own (XLNet, Whisper, ... in transformers) may use the list otherwise: both keep
`batch_decode`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["batch_text"]


def batch_text(tokenizer: Any, ids: Any) -> list[str]:
    """`tokenizer.batch_decode(ids, skip_special_tokens=True)` for a (rows, length) tensor or a
    list of id lists."""
    from transformers import PreTrainedTokenizer

    kind = type(tokenizer)
    if not (
        isinstance(tokenizer, PreTrainedTokenizer)
        and kind._decode is PreTrainedTokenizer._decode
        and kind.convert_ids_to_tokens is PreTrainedTokenizer.convert_ids_to_tokens
    ):
        return list(tokenizer.batch_decode(ids, skip_special_tokens=True))
    rows = ids.tolist() if hasattr(ids, "tolist") else [[int(i) for i in row] for row in ids]
    special = frozenset(tokenizer.all_special_ids)
    return [tokenizer.decode([i for i in row if i not in special]) for row in rows]
