"""captioner/token_text.py: caption text from token ids exactly as Hugging Face's
`batch_decode(skip_special_tokens=True)` gives it, for the tokenizers LAVIS really loads (the
tiny model's BertTokenizer, the placeholder BERT vocabulary, the tiny BLIP-2's OPT GPT2Tokenizer)
and a Rust tokenizer, on rows full of special, padding and unknown ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPT_DIR = ROOT / "models" / "tiny-blip2" / "opt"


def random_rows(tokenizer: Any, seed: int, rows: int = 40) -> list[list[int]]:
    """Rows that mix ordinary ids with every special id, runs of padding and repeats."""
    rng = random.Random(seed)
    ordinary = list(range(min(len(tokenizer), 3000)))
    special = list(tokenizer.all_special_ids)
    out = []
    for _ in range(rows):
        row = [rng.choice(special if rng.random() < 0.25 else ordinary) for _ in range(24)]
        row += [tokenizer.pad_token_id] * rng.randint(0, 6)
        out.append(row)
    out.append(list(special))  # nothing but special tokens: the empty caption
    return out


def check(tokenizer: Any, seed: int) -> None:
    import torch

    from captioner.token_text import batch_text

    rows = random_rows(tokenizer, seed)
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True)
    assert batch_text(tokenizer, rows) == expected
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    assert batch_text(tokenizer, padded) == tokenizer.batch_decode(padded, skip_special_tokens=True)
    assert expected[-1] == ""  # the special ids really were removed, and no more than them
    assert any(text for text in expected)


def test_tiny_model_tokenizer(tiny_captioner: Any) -> None:
    from transformers import PreTrainedTokenizer

    tokenizer = tiny_captioner.tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizer)  # the path that skips the per-token scan
    assert {"[DEC]", "[ENC]"} <= set(tokenizer.all_special_tokens)  # LAVIS's added specials
    check(tokenizer, seed=1)


def test_rows_as_a_list_of_tensors(tiny_captioner: Any) -> None:
    import torch

    from captioner.token_text import batch_text

    tokenizer = tiny_captioner.tokenizer
    rows = [torch.tensor(row) for row in random_rows(tokenizer, seed=4)]
    assert batch_text(tokenizer, rows) == tokenizer.batch_decode(rows, skip_special_tokens=True)


def test_a_tokenizer_with_its_own_decoder_keeps_batch_decode(tmp_path: Path) -> None:
    """Some slow tokenizers override `_decode` and may use the special ids otherwise."""
    from transformers import BertTokenizer

    import blip2_model
    from captioner.token_text import batch_text

    class Shouting(BertTokenizer):
        def _decode(self, token_ids: Any, **kwargs: Any) -> str:
            kept = [i for i in token_ids if i != self.cls_token_id]  # drops only [CLS]
            return super()._decode(kept, **{**kwargs, "skip_special_tokens": False}).upper()

    directory = blip2_model.write_placeholder_tokenizer(tmp_path / "vocab", vocab_size=400)
    tokenizer = Shouting.from_pretrained(str(directory), local_files_only=True)
    rows = random_rows(tokenizer, seed=5)
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True)
    assert "[SEP]" in " ".join(expected)  # its decoder keeps what the generic skip would drop
    assert batch_text(tokenizer, rows) == expected


def test_placeholder_bert_vocabulary(tmp_path: Path) -> None:
    import blip2_model
    from captioner.blip_build import load_tokenizer

    directory = blip2_model.write_placeholder_tokenizer(tmp_path / "vocab", vocab_size=400)
    check(load_tokenizer(directory), seed=2)


@pytest.mark.parametrize("fast", [False, True])
def test_opt_tokenizer(fast: bool) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(OPT_DIR), use_fast=fast)
    assert isinstance(tokenizer, PreTrainedTokenizer) is not fast
    check(tokenizer, seed=3)
