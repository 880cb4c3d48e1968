#!/usr/bin/env python3
"""Derive the bundled default emoji config from the `emoji` package's names and aliases.

The default is what a fresh offline install maps captions with, so it is derived from data we
may ship (the `emoji` package, BSD-licensed, carrying Unicode CLDR short names and GitHub
aliases), never from the upstream animal-farm config. The rules:

- only fully-qualified emojis without skin-tone modifiers; no country flags, keycaps, enclosed
  letters or other symbols whose names are letters or function words (`a`, `on`, `top`, `up`);
- every CLDR name and alias becomes an entry, lower-cased and accent-folded (`pinata`), names
  with other punctuation are dropped; multi-word names (`fire_engine`) also become phrases;
- `person_<verb>ing` names also give the verb alone (`surfing`, `running`);
- plurals the mapper's "strip one s" rule cannot reach are added (`boxes`, `butterflies`, `men`),
  and every multi-word name gets its plural phrase (`fire_engines`);
- a short table of caption words maps to emoji names where the names miss common nouns
  (`frisbee` → flying disc, `waves` → water wave rather than a waving hand);
- a few phrases map to "" (no emoji) so their words are not mapped alone (`fire_hydrant`);
- when several emojis claim a word: the synonym table, then a CLDR name over an alias, then the
  older, shorter emoji.

Usage: `python scripts/build_emoji_config.py [--out DIR] [--check]`. `--check` exits 1 if the
committed files differ from what the installed `emoji` package gives.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import emoji

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "emoji_config" / "bundled"

# Words that captions use constantly but that must not map: articles, prepositions, pronouns,
# and emoji names that are really letters or labels.
_STOP_TEXT = """
    a an the and or of in on at to up down top back end soon free new ok cool id ng sos vs
    b o ab cl m x tm atm wc abc abcd us it is are be as by for from with into over under
    this that these those his her its their our your my me we you he she they them one two
    three four five six seven eight nine ten zero hundred symbols information repeat
    congratulations secret accept vacancy japanese fu
"""
STOP_WORDS = frozenset(_STOP_TEXT.split())

# Caption words the CLDR names and aliases miss or get wrong, mapped to an emoji *name*.
SYNONYMS = {
    "frisbee": "flying_disc",
    "wave": "water_wave",
    "ocean": "water_wave",
    "sea": "water_wave",
    "beach": "beach_with_umbrella",
    "kid": "child",
    "puppy": "dog_face",
    "kitten": "cat_face",
    "donut": "doughnut",
    "tie": "necktie",
    "suitcase": "luggage",
    "phone": "mobile_phone",
    "cellphone": "mobile_phone",
    "smartphone": "mobile_phone",
    "cup": "hot_beverage",
    "mug": "hot_beverage",
    "coffee": "hot_beverage",
    "bottle": "baby_bottle",
    "couch": "couch_and_lamp",
    "sofa": "couch_and_lamp",
    "fork": "fork_and_knife",
    "bowl": "bowl_with_spoon",
    "clock": "mantelpiece_clock",
    "tree": "deciduous_tree",
    "flower": "blossom",
    "flowers": "bouquet",
    "snow": "snowflake",
    "building": "office_building",
    "city": "cityscape",
    "food": "fork_and_knife_with_plate",
    "plate": "fork_and_knife_with_plate",
    "park": "national_park",
    "field": "sheaf_of_rice",
    "grass": "herb",
    "road": "motorway",
    "street": "motorway",
    "table": "chair",
    "surfboard": "person_surfing",
    "snowboard": "snowboarder",
    "skier": "skier",
    "people": "people_hugging",
    "player": "person_bouncing_ball",
    "ball": "soccer_ball",
    "hat": "top_hat",
    "sky": "sun_behind_cloud",
    "teeth": "tooth",
    "wine": "wine_glass",
    "racket": "tennis",
    "racquet": "tennis",
}

# Phrases that must be read as one thing with no emoji, so their words do not map on their own
# (a "fire hydrant" is not a fire). A value of "" means "no emoji" to the mapper.
NO_EMOJI_PHRASES = ("fire_hydrant",)

IRREGULAR_PLURALS = {
    "man": "men",
    "woman": "women",
    "child": "children",
    "person": "people",
    "mouse": "mice",
    "goose": "geese",
    "tooth": "teeth",
    "foot": "feet",
    "ox": "oxen",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "loaf": "loaves",
    "elf": "elves",
    "shelf": "shelves",
    "scarf": "scarves",
}
UNCHANGING_PLURALS = frozenset({"sheep", "fish", "deer", "bison", "moose", "shrimp", "squid"})

SKIN_TONES = range(0x1F3FB, 0x1F400)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAGS = range(0xE0020, 0xE0080)
ENCLOSED = range(0x1F170, 0x1F252)  # squared/circled letters and ideographs
CLOCK_FACES = range(0x1F550, 0x1F568)  # "one o'clock", "one-thirty": times, not things
NAME_RE = re.compile(r"[a-z][a-z0-9'\-]*(?:_[a-z0-9'\-]+)*")


def _skip(em: str) -> bool:
    """Emojis whose names are not caption vocabulary."""
    codes = [ord(c) for c in em]
    return (
        any(c in SKIN_TONES or c in REGIONAL_INDICATORS or c in TAGS for c in codes)
        or 0x20E3 in codes  # keycaps
        or codes[0] in ENCLOSED
        or codes[0] in CLOCK_FACES
        or codes[0] < 0x2190  # ©, ®, ‼, ⁉, ™, ℹ: letters and punctuation
        or codes[0] == 0x24C2  # Ⓜ
    )


def _clean(name: str) -> str | None:
    """`:Fire_Engine:` → `fire_engine`; None for names with punctuation captions never have."""
    text = name.strip(":").lower().replace("\u2019", "'")
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if not NAME_RE.fullmatch(text) or any(ch.isdigit() for ch in text):
        return None
    if "_" not in text and text in STOP_WORDS:
        return None
    return text


def plural(word: str) -> str:
    """English plural of a single noun (good enough for emoji names)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word in UNCHANGING_PLURALS:
        return word
    if word.endswith(("ss", "us", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("s"):  # already plural (`skis`, `tickets`) or uncountable (`tennis`)
        return word
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def plural_phrase(name: str) -> str:
    """Pluralise the last word: `fire_engine` → `fire_engines`."""
    head, _, last = name.rpartition("_")
    return f"{head}_{plural(last)}" if head else plural(last)


def _candidates() -> Iterator[tuple[str, tuple[int, float, int, str], str]]:
    """(word, rank, emoji) for every word an emoji can be named by; lower rank wins."""
    for em, info in emoji.EMOJI_DATA.items():
        if info.get("status") != emoji.STATUS["fully_qualified"] or _skip(em):
            continue
        version = float(info.get("E", 99))
        for kind, raw in enumerate([info["en"], *info.get("alias", [])]):
            name = _clean(raw)
            if name is None:
                continue
            rank = (1 if kind == 0 else 2, version, len(em), em)
            yield name, rank, em
            if name.startswith("person_") and name.count("_") == 1 and name.endswith("ing"):
                verb = name.removeprefix("person_")
                if verb not in STOP_WORDS:
                    yield verb, (3, *rank[1:]), em


def build() -> tuple[dict[str, str], list[str]]:
    """The default (mappings, phrases)."""
    best: dict[str, tuple[tuple[int, float, int, str], str]] = {}
    for word, rank, em in _candidates():
        if word not in best or rank < best[word][0]:
            best[word] = (rank, em)
    by_name = {word: em for word, (_, em) in best.items()}
    for word, target in SYNONYMS.items():
        if target not in by_name:
            raise SystemExit(f"synonym {word!r} → {target!r}: no emoji has that name")
        best[word] = ((0, 0.0, 0, ""), by_name[target])

    table = {word: em for word, (_, em) in best.items()}
    table.update(dict.fromkeys(NO_EMOJI_PHRASES, ""))
    phrases: set[str] = set()
    for word, em in list(table.items()):
        if word.endswith(("ing", "ed")):  # verbs and adjectives have no plural
            if "_" in word:
                phrases.add(word)
            continue
        many = plural_phrase(word)
        if "_" in word:
            phrases.update((word, many))
        # The mapper already turns "cats" into "cat"; store only plurals it cannot derive.
        if many != word and (many[:-1] != word or len(many) <= 3):
            table.setdefault(many, em)
    return dict(sorted(table.items())), sorted(phrases)


def render() -> dict[str, str]:
    """File name → content of the bundled default."""
    table, phrases = build()
    readme = (
        "# Bundled default emoji config\n\n"
        "Generated by `scripts/build_emoji_config.py` from the `emoji` package "
        f"{emoji.__version__} (Unicode CLDR names and GitHub aliases). Do not edit by hand: "
        "change the script and run it again.\n\n"
        f"- `emoji_mappings.json`: {len(table)} words\n"
        f"- `mwe.txt`: {len(phrases)} phrases\n"
    )
    return {
        "emoji_mappings.json": json.dumps(table, ensure_ascii=False, indent=1) + "\n",
        "mwe.txt": "\n".join(phrases) + "\n",
        "README.md": readme,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = render()
    if args.check:
        stale = [
            name
            for name, text in files.items()
            if not (args.out / name).is_file()
            or (args.out / name).read_text(encoding="utf-8") != text
        ]
        if stale:
            print(f"out of date in {args.out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
