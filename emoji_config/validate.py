"""Checks a config file must pass before it is used or cached.

A download that fails these checks (an HTML error page from a proxy, a truncated body, an empty
file) is rejected so the last good copy stays in service.
"""

from __future__ import annotations

import json
import re

MAPPINGS_NAME = "emoji_mappings.json"
MWE_NAME = "mwe.txt"

# Generous bounds: the upstream files are ~0.2 MB / 7k entries and ~1 MB / 65k lines.
MAX_BYTES = {MAPPINGS_NAME: 8 * 1024 * 1024, MWE_NAME: 16 * 1024 * 1024}
MAX_ENTRIES = 500_000
MAX_KEY_CHARS = 200
MAX_EMOJI_CHARS = 32
MAX_LINE_CHARS = 200
MAX_LINE_WORDS = 16


class ConfigError(ValueError):
    """A config file is not usable; the message says why."""


def _decode(data: bytes, name: str) -> str:
    limit = MAX_BYTES[name]
    if len(data) > limit:
        raise ConfigError(f"{name}: {len(data)} bytes exceeds the {limit}-byte limit")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def parse_mappings(data: bytes) -> dict[str, str]:
    """Parse and check `emoji_mappings.json`: a non-empty JSON object of string → string."""
    text = _decode(data, MAPPINGS_NAME)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{MAPPINGS_NAME}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{MAPPINGS_NAME}: expected a JSON object, got {type(obj).__name__}")
    if not obj:
        raise ConfigError(f"{MAPPINGS_NAME}: no entries")
    if len(obj) > MAX_ENTRIES:
        raise ConfigError(f"{MAPPINGS_NAME}: {len(obj)} entries exceeds {MAX_ENTRIES}")
    for key, value in obj.items():
        if not key or len(key) > MAX_KEY_CHARS:
            raise ConfigError(f"{MAPPINGS_NAME}: bad key {key[:40]!r}")
        if not isinstance(value, str):
            raise ConfigError(
                f"{MAPPINGS_NAME}: value of {key[:40]!r} is {type(value).__name__}, not a string"
            )
        if len(value) > MAX_EMOJI_CHARS:
            raise ConfigError(f"{MAPPINGS_NAME}: value of {key[:40]!r} is too long")
    return obj


# Control characters (Unicode category Cc) other than tab, and the HTML markers < and >.
_BAD_CHAR = re.compile(r"[<>\x00-\x08\x0a-\x1f\x7f-\x9f]")


def parse_mwe(data: bytes) -> list[str]:
    """Parse and check `mwe.txt`: the non-blank lines, each a plausible phrase.

    Lines are split like the reference (``str.splitlines``). ``<`` and ``>`` are refused so an HTML
    page served with status 200 is never taken for a phrase list.
    """
    text = _decode(data, MWE_NAME)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{MWE_NAME}: no phrases (empty file)")
    if len(lines) > MAX_ENTRIES:
        raise ConfigError(f"{MWE_NAME}: {len(lines)} lines exceeds {MAX_ENTRIES}")
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_CHARS:
            raise ConfigError(f"{MWE_NAME}: phrase {number} is longer than {MAX_LINE_CHARS}")
        bad = _BAD_CHAR.search(line)
        if bad is not None:
            raise ConfigError(f"{MWE_NAME}: phrase {number} contains {bad.group()!r}")
        if len(line.replace("_", " ").split()) > MAX_LINE_WORDS:
            raise ConfigError(f"{MWE_NAME}: phrase {number} has more than {MAX_LINE_WORDS} words")
    return lines


PARSERS = {MAPPINGS_NAME: parse_mappings, MWE_NAME: parse_mwe}
