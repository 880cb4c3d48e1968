"""A GPT-2 style byte-level BPE tokenizer for a small word list, written as OPT's files.

Real BLIP-2 OPT models read facebook/opt-*'s GPT2Tokenizer files (vocab.json, merges.txt). The
tiny BLIP-2 needs the same tokenizer class with a vocabulary of a few hundred entries, offline:
every byte is a token (so any text still encodes), plus one merge chain per word, with and
without the leading space (Ġ). Space-prefixed chains rank first, so " circle" is one token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order (`bytes_to_unicode`)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def bpe_tables(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) whose BPE turns each word, with or without a leading space, into one
    token."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    for char in byte_alphabet():
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    ordered = sorted(set(words))
    for lead in ("Ġ", ""):
        for word in ordered:
            symbols = list(lead + word)
            current = symbols[0]
            for symbol in symbols[1:]:
                pair = (current, symbol)
                current += symbol
                if pair not in seen:
                    seen.add(pair)
                    merges.append(pair)
                vocab.setdefault(current, len(vocab))
    return vocab, merges


def write_opt_tokenizer(directory: Path, words: Iterable[str], size: int = 0) -> int:
    """vocab.json, merges.txt and OPT's tokenizer settings; returns the vocabulary size.

    `size` pads the vocabulary with filler words (never produced by the merges, decodable)
    up to a model's vocab_size, for random-weight models whose ids can be anything."""
    vocab, merges = bpe_tables(words)
    while len(vocab) < size:
        vocab.setdefault(f"\u0120w{len(vocab)}", len(vocab))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # As facebook/opt-*: </s> doubles as BOS, EOS and UNK; the BOS is added to every text.
    settings = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True,
        "add_prefix_space": False,
        "errors": "replace",
        "bos_token": "</s>",
        "eos_token": "</s>",
        "unk_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 1000000000000000019884624838656,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=1), "utf-8")
    specials = {k: settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=1), "utf-8")
    return len(vocab)
