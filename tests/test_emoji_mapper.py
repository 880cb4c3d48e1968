"""The mapper against CONTRACT.md "Emoji mapping": small tables, and parity on the reference config.

Parity is checked against `spec_map`, a deliberately plain re-statement of the contract written
without NLTK, on the upstream config in ../shared/reference-config (read there, never copied).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from conftest import REFERENCE_CONFIG, ROOT

from emoji_config import EmojiMapper

STRIP = '.,!?;:"()[]{}'
OVERRIDES = {
    "glass": "🥛",
    "glasses": "👓",
    "wood": "🌲",
    "wooden": "🌲",
    "metal": "🔧",
    "metallic": "🔧",
}
REF_MAPPINGS = REFERENCE_CONFIG / "emoji_mappings.json"
REF_MWE = REFERENCE_CONFIG / "mwe.txt"
needs_reference = pytest.mark.skipif(
    not (REF_MAPPINGS.is_file() and REF_MWE.is_file()),
    reason=f"reference emoji config not found in {REFERENCE_CONFIG} (parity data lives outside "
    "the repository, see CONTRACT.md)",
)


def phrase_set(mwe_lines: list[str]) -> frozenset[tuple[str, ...]]:
    """`mwe.txt` lines as word tuples (``_`` and spaces separate words; blanks ignored)."""
    return frozenset(t for t in (tuple(x.replace("_", " ").split()) for x in mwe_lines) if t)


def spec_map(
    caption: str, table: Mapping[str, str], phrases: frozenset[tuple[str, ...]]
) -> list[dict]:
    """CONTRACT.md steps 1-5, written out the obvious way."""
    if not caption.strip():
        return []
    words = []
    for piece in caption.split():
        piece = piece.strip(STRIP)
        if piece:
            words.append(piece.lower())
    tokens, i = [], 0
    while i < len(words):
        for size in range(len(words) - i, 0, -1):  # longest first
            if tuple(words[i : i + size]) in phrases:
                tokens.append("_".join(words[i : i + size]))
                i += size
                break
        else:
            tokens.append(words[i])
            i += 1
    result: dict[str, str] = {}
    for token in tokens:
        if token in OVERRIDES:
            emoji = OVERRIDES[token]
        elif token in table:
            emoji = table[token]
        elif len(token) > 3 and token.endswith("s"):
            emoji = table.get(token[:-1])
        else:
            emoji = None
        if emoji and token not in result:
            result[token] = emoji
    return [{"emoji": e, "word": w} for w, e in result.items()]


# ----- small tables: each rule on its own ------------------------------------------------------

SMALL = {
    "dog": "🐶",
    "cat": "🐱",
    "bus": "🚌",
    "fire_engine": "🚒",
    "young_boy": "",
    "boy": "👦",
    "toothbrush": "🪥",
    "ice_cream_cone": "🍦",
    "ice": "🧊",
    "cream": "🥛",
    "dres": "👗",
    "glass": "🍷",
    "kiwi": "",
    "pants": "",
    "pant": "🩳",
    "ad": "📢",
    "cats": "🐈",
    "t-shirt": "👕",
    "rock'n'roll": "🎸",
}
SMALL_MWE = ["fire_engine", "young_boy", "ice_cream", "ice_cream_cone", "lone"]


@pytest.fixture(scope="module")
def small() -> EmojiMapper:
    return EmojiMapper(SMALL, SMALL_MWE)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("", []),
        ("   \t\n ", []),
        ("a dog", [("🐶", "dog")]),
        ("A DOG!", [("🐶", "dog")]),
        ("dogs and cats", [("🐶", "dogs"), ("🐈", "cats")]),  # table entry beats the plural rule
        ("two buss", [("🚌", "buss")]),  # plural rule: 4+ characters ending in s
        ("ads", []),  # ... and only those: "ads" is 3 characters, no fallback to "ad"
        ("pants", []),  # a "" value stops the lookup: no fallback to "pant"
        ("kiwis", []),  # the plural rule reaching a "" value gives nothing either
        ("a dress", [("👗", "dress")]),  # plural rule applies to any 4+ letter word ending in s
        ("bus", [("🚌", "bus")]),
        ("a young boy", []),  # the phrase has no emoji and swallows both words
        ("a young boys", [("👦", "boys")]),  # no phrase "young_boys": words map alone
        ("a fire engine", [("🚒", "fire_engine")]),
        ("fire engines", []),  # no phrase "fire_engines": "fire", "engines" have no entries
        ("ice cream cone", [("🍦", "ice_cream_cone")]),  # longest phrase wins
        ("ice cream", []),  # merged, and "ice_cream" has no entry
        ("ice cream, cone", [("🍦", "ice_cream_cone")]),  # the comma is stripped first
        ("ice creams", [("🧊", "ice"), ("🥛", "creams")]),  # no full phrase: words map alone
        ("glass of wine", [("🥛", "glass")]),  # the override table wins over the table
        ("wooden metallic", [("🌲", "wooden"), ("🔧", "metallic")]),
        ("dog dog cat dog", [("🐶", "dog"), ("🐱", "cat")]),  # first occurrence, once
        ('"(dog)" [cat]. {bus}?', [("🐶", "dog"), ("🐱", "cat"), ("🚌", "bus")]),
        ("a t-shirt", [("👕", "t-shirt")]),  # hyphens are kept
        ("rock'n'roll!", [("🎸", "rock'n'roll")]),  # apostrophes are kept
        ("dog's bowl", []),  # "dog's" is its own token
        ("...", []),
        ("FIRE   ENGINE", [("🚒", "fire_engine")]),
    ],
)
def test_rules_on_a_small_table(small: EmojiMapper, caption: str, expected: list) -> None:
    got = small.map(caption)
    assert got == [{"emoji": e, "word": w} for e, w in expected]
    assert got == spec_map(caption, SMALL, phrase_set(SMALL_MWE))


def test_mwe_lines_are_read_like_the_reference() -> None:
    mapper = EmojiMapper(
        {"hot_dog": "🌭", "ice_cream": "🍨"}, ["  hot_dog  ", "", "ice cream", "_"]
    )
    assert mapper.mwes_count == 2
    assert mapper.map("a hot dog and ice cream") == [
        {"emoji": "🌭", "word": "hot_dog"},
        {"emoji": "🍨", "word": "ice_cream"},
    ]


def test_mapper_is_independent_of_the_input_dict() -> None:
    table = {"dog": "🐶"}
    mapper = EmojiMapper(table, [])
    table["dog"] = "🐕"
    assert mapper.map("dog") == [{"emoji": "🐶", "word": "dog"}]


# ----- parity on the reference config ------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, str], list[str], EmojiMapper, frozenset]:
    if not (REF_MAPPINGS.is_file() and REF_MWE.is_file()):
        pytest.skip(f"reference emoji config not found in {REFERENCE_CONFIG}")
    table = json.loads(REF_MAPPINGS.read_text(encoding="utf-8"))
    lines = REF_MWE.read_text(encoding="utf-8").splitlines()
    return table, lines, EmojiMapper(table, lines), phrase_set(lines)


HAND_WRITTEN = [
    "two dogs playing with a frisbee in the park",
    "a young boy brushing his teeth with a toothbrush",
    "a surfer riding waves at sunset",
    "a man in a military uniform handing flowers to a little girl",
    "A man in a military uniform handing flowers to a little girl",
    "a cat sitting on top of a wooden table",
    "a glass of wine next to a pair of glasses",
    "a metal fence in front of a metallic building",
    "a fire hydrant on the side of a street",
    "a red fire truck parked in front of a fire station",
    "a hot dog with mustard and ketchup on a paper plate",
    "two giraffes standing next to each other in a field",
    "a herd of zebras grazing on the grass",
    "a group of people standing around a kitchen",
    "a plate of food with broccoli, carrots, and rice.",
    "a woman holding an umbrella in the rain!",
    "is this a cat? or a dog?",
    "an elephant's trunk reaching for a banana",
    "the man's hat is on the woman's head",
    "a t-shirt with a picture of a teddy bear on it",
    "a black-and-white photo of a train on the tracks",
    "a double-decker bus driving down a city street",
    "a stop sign at the corner of a street",
    "a laptop computer sitting on top of a desk",
    "a cell phone next to a remote control",
    "a baseball player swinging a bat at a ball",
    "a tennis player hitting a ball with a racket",
    "a skateboarder doing a trick on a ramp",
    "a man riding a wave on top of a surfboard",
    "a person on skis going down a snowy slope",
    "a kite flying in the blue sky",
    "a bowl of fruit with apples, oranges and bananas",
    "a pizza with pepperoni and mushrooms on a wooden board",
    "a slice of cake on a white plate with a fork",
    "a cup of coffee and a donut on a table",
    "a toilet and a sink in a small bathroom",
    "a bedroom with a bed, a lamp and a window",
    "a living room with a couch and a television",
    "a refrigerator with magnets on the door",
    "a clock tower in the middle of a city",
    "an airplane flying over a mountain range",
    "a boat docked at a pier on a lake",
    "a horse-drawn carriage on a cobblestone street",
    "a cow standing in a grassy field",
    "sheep grazing on a hillside",
    "a bird perched on a tree branch",
    "a bear walking through the woods",
    "a teddy bear sitting on a chair",
    "a vase with flowers on a table",
    "scissors, glue and paper on a desk",
    "a person holding a glass of water",
    "glasses on a wooden desk",
    "GLASSES ON A WOODEN DESK",
    "Glass, wood, metal.",
    "(a dog) [a cat] {a bus}",
    '"quoted words" in a caption',
    "a dog; a cat: a bird!",
    "dogs dogs dogs",
    "a dog and another dog and a dog",
    "",
    "   ",
    "!!!",
    "a",
    "dogs",
    "buses",
    "glasses",
    "waves",
    "boxes of pizzas",
    "ice cream cones on a hot summer day",
    "a hot air balloon over the desert",
    "a polar bear swimming in cold water",
    "a golden retriever catching a frisbee",
    "a swimming pool next to a palm tree",
    "a christmas tree with presents underneath",
    "a traffic light at an intersection",
    "a man wearing a tie and a suit",
    "a woman in a wedding dress",
    "a baby sleeping in a crib",
    "children playing soccer on a field",
    "a soccer ball on the grass",
    "a fire engine driving down the road",
    "a police car with its lights on",
    "a bunch of bananas hanging from a tree",
    "a sandwich cut in half on a cutting board",
    "a train traveling over a bridge",
    "an old man with a cane",
    "a little girl with a balloon",
    "a young boy and a young girl",
    "a young boy's bicycle",
    "the sun setting over the ocean",
    "snow-covered mountains under a clear sky",
    "a computer mouse and keyboard",
    "a cat laying on a keyboard",
    "a motorcycle parked next to a car",
    "a dog wearing sunglasses",
    "a birthday cake with candles",
    "an orange cat",
    "oranges and lemons",
    "a man's hand holding a smartphone",
    "two women's shoes",
    "a peace sign painted on a wall",
    "a qr code on a poster",
    "train tracks leading to a station",
    "a bra top and boxer briefs",
    "'s gravenhage at night",
    "a .22 caliber rifle",
    "café au lait on a table",
    "naïve art of a dog",
    "Ünïcödé dogs",
    "tab\tseparated\twords with dogs",
    "new\u00a0line\u2003spaces dogs",
]


@needs_reference
def test_contract_examples(reference: tuple) -> None:
    mapper = reference[2]
    assert mapper.map("two dogs playing with a frisbee in the park") == [
        {"emoji": "🐶", "word": "dogs"},
        {"emoji": "🧑", "word": "playing"},
        {"emoji": "🥏", "word": "frisbee"},
        {"emoji": "⛲", "word": "park"},
    ]
    assert mapper.map("a young boy brushing his teeth with a toothbrush") == [
        {"emoji": "🦷", "word": "teeth"},
        {"emoji": "🪥", "word": "toothbrush"},
    ]
    assert mapper.map("a surfer riding waves at sunset") == [
        {"emoji": "🏄", "word": "surfer"},
        {"emoji": "🌊", "word": "waves"},
        {"emoji": "🌅", "word": "sunset"},
    ]


@needs_reference
@pytest.mark.parametrize("caption", HAND_WRITTEN)
def test_parity_hand_written(reference: tuple, caption: str) -> None:
    table, _, mapper, phrases = reference
    assert mapper.map(caption) == spec_map(caption, table, phrases)


def _generated_captions(table: dict[str, str], lines: list[str], count: int) -> list[str]:
    """Captions built from the reference vocabulary: phrases, plurals, empty values, noise."""
    rng = random.Random(20240607)
    phrases = [line.replace("_", " ") for line in lines]
    words = sorted(table)
    empty = sorted(k for k, v in table.items() if v == "")
    fillers = ["a", "the", "of", "with", "and", "on", "two", "near", "in front of"]
    wrap = ["{}", "{}.", "{},", "({})", '"{}"', "{}!", "[{}]", "{}?", "{};", "{}:"]
    captions = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(rng.choice(phrases))
            elif kind < 0.4 and phrases:
                # a phrase cut short or run on: tests backtracking in the phrase trie
                words_of = rng.choice(phrases).split()
                parts.append(" ".join(words_of[: rng.randint(1, len(words_of))]))
            elif kind < 0.6:
                parts.append(rng.choice(words) + rng.choice(["", "s", "es"]))
            elif kind < 0.65 and empty:
                parts.append(rng.choice(empty) + rng.choice(["", "s"]))
            else:
                parts.append(rng.choice(fillers))
        text = " ".join(rng.choice(wrap).format(p) if rng.random() < 0.2 else p for p in parts)
        if rng.random() < 0.2:
            text = text.upper() if rng.random() < 0.5 else text.capitalize()
        captions.append(text)
    return captions


@needs_reference
def test_parity_generated(reference: tuple) -> None:
    table, lines, mapper, phrases = reference
    captions = _generated_captions(table, lines, 2000)
    mismatches = [c for c in captions if mapper.map(c) != spec_map(c, table, phrases)]
    assert not mismatches, mismatches[:5]
    # The sample exercised what it is meant to: merges, empty values, and plural fallbacks.
    mapped = [m for c in captions for m in mapper.map(c)]
    assert any("_" in m["word"] for m in mapped)
    assert any(m["word"] not in table and m["word"][:-1] in table for m in mapped)


@needs_reference
def test_speed_budget(reference: tuple) -> None:
    """Issue 4 budgets, with a wide margin (benchmarks/emoji_speed.py has the real numbers)."""
    table, lines, mapper, _ = reference
    started = time.perf_counter()
    EmojiMapper(table, lines)
    assert time.perf_counter() - started < 2.0
    caption = "a young boy and two dogs playing with a red frisbee in the park near a fire engine"
    caption += " at sunset"
    assert len(caption.split()) == 20
    started = time.perf_counter()
    for _ in range(1000):
        mapper.map(caption)
    assert (time.perf_counter() - started) / 1000 < 0.001


# ----- the CLI --------------------------------------------------------------------------------


def _cli(args: list[str], captions: str, env: dict[str, str] | None = None) -> list[list]:
    done = subprocess.run(
        [sys.executable, "-m", "emoji_config", *args],
        input=captions.encode("utf-8"),
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=60,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.decode("utf-8").splitlines()]


@needs_reference
def test_cli_with_reference_files(reference: tuple) -> None:
    table, _, _, phrases = reference
    captions = HAND_WRITTEN[:40] + ["", "a dog\r"]
    out = _cli(
        ["--mappings", str(REF_MAPPINGS), "--mwe", str(REF_MWE)],
        "\n".join(captions) + "\n",
    )
    assert len(out) == len(captions)
    for caption, got in zip(captions, out, strict=True):
        assert got == spec_map(caption, table, phrases)
    assert out[0][0] == {"emoji": "🐶", "word": "dogs"}


def test_cli_writes_utf8_json(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"dog": "🐶", "café": "☕"}', encoding="utf-8")
    (tmp_path / "w.txt").write_text("hot_dog\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "emoji_config", "--mappings", "m.json", "--mwe", "w.txt"],
        input="a dog in a café\nnothing here\n".encode(),
        capture_output=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "ascii", "LC_ALL": "C"},
        timeout=60,
        check=True,
    )
    assert done.stdout.decode("utf-8").splitlines() == [
        '[{"emoji": "🐶", "word": "dog"}, {"emoji": "☕", "word": "café"}]',
        "[]",
    ]


def test_cli_rejects_half_the_flags_and_bad_files(tmp_path: Path) -> None:
    half = subprocess.run(
        [sys.executable, "-m", "emoji_config", "--mappings", "x.json"],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    assert half.returncode == 2 and b"go together" in half.stderr
    (tmp_path / "bad.json").write_text("[1, 2]", encoding="utf-8")
    (tmp_path / "w.txt").write_text("a_b\n", encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "emoji_config", "--mappings", "bad.json", "--mwe", "w.txt"],
        capture_output=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert bad.returncode == 2 and b"expected a JSON object" in bad.stderr
