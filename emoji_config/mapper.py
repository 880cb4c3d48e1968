"""Caption → emoji mapping, exactly as CONTRACT.md "Emoji mapping" specifies.

The reference service merges multi-word expressions with NLTK's ``MWETokenizer``; we use the same
class so phrase matching (greedy, longest match first, left to right) is identical by
construction rather than by re-implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

# Fixed overrides the reference applies before the table (CONTRACT.md step 4).
PRIORITY_OVERRIDES: Mapping[str, str] = MappingProxyType(
    {
        "glass": "🥛",
        "glasses": "👓",
        "wood": "🌲",
        "wooden": "🌲",
        "metal": "🔧",
        "metallic": "🔧",
    }
)

# Characters stripped from both ends of each whitespace-separated piece (CONTRACT.md step 2).
STRIP_CHARS = '.,!?;:"()[]{}'
SEPARATOR = "_"


def mwe_tuples(lines: Iterable[str]) -> list[tuple[str, ...]]:
    """Turn `mwe.txt` lines into word tuples the way the reference does.

    Blank lines are skipped; ``_`` and whitespace both separate words.
    """
    tuples: list[tuple[str, ...]] = []
    for line in lines:
        words = tuple(line.replace(SEPARATOR, " ").split())
        if words:
            tuples.append(words)
    return tuples


def caption_words(caption: str) -> list[str]:
    """Split, strip punctuation, drop empties, lower-case (CONTRACT.md step 2)."""
    words: list[str] = []
    for piece in caption.split():
        word = piece.strip(STRIP_CHARS)
        if word:
            words.append(word.lower())
    return words


def plural_stem(token: str) -> str | None:
    """The singular the plural rule tries for `token`: without its final ``s`` when longer than
    3 characters (CONTRACT.md step 4), else None."""
    if len(token) > 3 and token.endswith("s"):
        return token[:-1]
    return None


class EmojiMapper:
    """An immutable caption mapper built from one config (table + phrase list).

    Immutable so the store can swap a whole config with one reference assignment while request
    threads keep using the old one.
    """

    __slots__ = ("_table", "_tokenizer", "mappings_count", "mwes_count")

    def __init__(self, mappings: Mapping[str, str], mwes: Iterable[str]) -> None:
        # Imported here: importing NLTK costs close to a second and must not happen at import time.
        from nltk.tokenize.mwe import MWETokenizer

        phrases = mwe_tuples(mwes)
        self._table: dict[str, str] = dict(mappings)
        self._tokenizer: Any = MWETokenizer(phrases, separator=SEPARATOR)
        self.mappings_count = len(self._table)
        self.mwes_count = len(phrases)

    def tokens(self, caption: str) -> list[str]:
        """The caption's tokens after phrase merging (CONTRACT.md steps 1-3)."""
        if not caption or not caption.strip():
            return []
        return self._tokenizer.tokenize(caption_words(caption))

    def lookup(self, token: str) -> str | None:
        """Override table, then the table, without the plural rule; None for an unknown word.

        A known word with no emoji gives ``""``.
        """
        if token in PRIORITY_OVERRIDES:
            return PRIORITY_OVERRIDES[token]
        return self._table.get(token)

    def emoji_for(self, token: str) -> str | None:
        """Override table, then the table, then the plural rule (CONTRACT.md step 4).

        A table value of ``""`` is returned as is: it means "no emoji" and blocks the plural
        fallback.
        """
        known = self.lookup(token)
        if known is not None:
            return known
        stem = plural_stem(token)
        return None if stem is None else self._table.get(stem)

    def map(self, caption: str) -> list[dict[str, str]]:
        """``[{"emoji": …, "word": …}, …]`` for the first occurrence of each mapped token."""
        found: dict[str, str] = {}
        for token in self.tokens(caption):
            if token in found:
                continue
            emoji = self.emoji_for(token)
            if emoji:
                found[token] = emoji
        return [{"emoji": emoji, "word": word} for word, emoji in found.items()]
