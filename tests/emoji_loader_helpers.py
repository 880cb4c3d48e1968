"""Shared by the emoji config loader tests (tests/test_emoji_loader*.py): config "A" as the fake
GitHub serves it, settings pointing at a local server, and the fixtures `_nltk_imported`
(autouse) and `primed` (a test module imports them by name so pytest finds them there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emoji_config import EmojiConfigStore, EmojiMapper
from local_http import LocalHTTPServer
from settings import Settings

MAPPINGS = "/config/emoji_mappings.json"
MWE = "/config/mwe.txt"

# Config "A": what the fake GitHub serves first.
A_TABLE = {"dog": "🐶", "fire_engine": "🚒", "young_boy": "", "boy": "👦", "toothbrush": "🪥"}
A_MWE = "fire_engine\nyoung_boy\n"
A_BYTES = json.dumps(A_TABLE, ensure_ascii=False).encode()
CAPTION = "a young boy and two dogs near a fire engine"
A_RESULT = [{"emoji": "🐶", "word": "dogs"}, {"emoji": "🚒", "word": "fire_engine"}]


@pytest.fixture(autouse=True, scope="module")
def _nltk_imported() -> None:
    """Import NLTK once up front so timing assertions measure the loader, not the import."""
    EmojiMapper({}, [])


def settings_for(server: LocalHTTPServer, cache: Path, **changes: object) -> Settings:
    base = Settings().with_overrides(
        auto_update=True,
        timeout=3.0,
        emoji_mappings_url=server.url(MAPPINGS),
        mwe_url=server.url(MWE),
        emoji_cache_dir=cache,
        emoji_refresh_seconds=0.0,
    )
    return base.with_overrides(**changes)


def loaded(settings: Settings) -> EmojiConfigStore:
    store = EmojiConfigStore(settings)
    store.load()
    return store


def serve_a(server: LocalHTTPServer) -> None:
    server.set(MAPPINGS, A_BYTES, headers={"ETag": '"a1"', "Content-Type": "application/json"})
    server.set(MWE, A_MWE, headers={"Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"})


@pytest.fixture
def primed(http_server: LocalHTTPServer, tmp_path: Path) -> Path:
    """A cache directory holding config A, written by a successful start-up."""
    cache = tmp_path / "cache"
    serve_a(http_server)
    loaded(settings_for(http_server, cache))
    assert (cache / "emoji_mappings.json").read_bytes() == A_BYTES
    return cache
