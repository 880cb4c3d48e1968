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

    def emoji_for(self, token: str) -> str | None:
        """Override table, then the table, then the plural rule (CONTRACT.md step 4).

        A table value of ``""`` is returned as is: it means "no emoji" and blocks the plural
        fallback.
        """
        if token in PRIORITY_OVERRIDES:
            return PRIORITY_OVERRIDES[token]
        table = self._table
        if token in table:
            return table[token]
        if len(token) > 3 and token.endswith("s"):
            return table.get(token[:-1])
        return None

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
