"""Captions → the `predictions` entries callers see: contract casing plus emoji mappings.

One place for the shape, so the HTTP routes, the job results and the CLI's JSON Lines carry the
same fields. The emoji config in use is read once per result, so all captions of one image are
mapped with one consistent config even while a refresh swaps it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from emoji_config import EmojiMapper
from emoji_config.tags import tags_for


def prediction(caption: str, mapper: EmojiMapper, *, tags: bool = False) -> dict[str, Any]:
    """`{"text": "Capitalised caption", "emoji_mappings": [...]}`; the reference omits an empty
    `emoji_mappings` rather than sending []. `tags` adds the caption's tags (absent unless
    asked for, so the drop-in contract is unchanged)."""
    entry: dict[str, Any] = {"text": caption.strip().capitalize()}
    mappings = mapper.map(caption)
    if mappings:
        entry["emoji_mappings"] = mappings
    if tags:
        entry["tags"] = tags_for(caption, mapper)
    return entry


def predictions(
    captions: Sequence[str], mapper: EmojiMapper, *, tags: bool = False
) -> list[dict[str, Any]]:
    return [prediction(caption, mapper, tags=tags) for caption in captions]
