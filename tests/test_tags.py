"""emoji_config.tags: caption tags from real captions, with the bundled and the reference config.

The tiny model captions real drawn images; small hand-written configs pin each rule; the
reference config (outside the repository, see CONTRACT.md) shows the upstream phrase list's effect.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from conftest import REFERENCE_CONFIG, ROOT

from emoji_config import EmojiConfigStore, EmojiMapper
from emoji_config.tags import STOP_WORDS, fold_plural, tags_for

sys.path.insert(0, str(ROOT / "scripts"))
import tiny_shapes  # noqa: E402

BUNDLED = ROOT / "emoji_config" / "bundled"
needs_reference = pytest.mark.skipif(
    not (REFERENCE_CONFIG / "mwe.txt").is_file(),
    reason=f"reference emoji config not found in {REFERENCE_CONFIG} (parity data lives outside "
    "the repository, see CONTRACT.md)",
)


def mapper_from(folder: Path) -> EmojiMapper:
    mappings = json.loads((folder / "emoji_mappings.json").read_text(encoding="utf-8"))
    return EmojiMapper(mappings, (folder / "mwe.txt").read_text(encoding="utf-8").splitlines())


@pytest.fixture(scope="module")
def bundled() -> EmojiMapper:
    return mapper_from(BUNDLED)


@pytest.fixture(scope="module")
def reference() -> EmojiMapper:
    return mapper_from(REFERENCE_CONFIG)


SCENES = [  # the scenes test_model.py checks the tiny model captions exactly
    (tiny_shapes.Scene(2, "red", "circle", "gray"), 3),
    (tiny_shapes.Scene(3, "blue", "square", "white"), 4),
    (tiny_shapes.Scene(1, "yellow", "triangle", "black"), 8),
]


@pytest.fixture(scope="module")
def tiny_captions(tiny_captioner) -> list[str]:
    images = [tiny_shapes.draw(scene, random.Random(seed)) for scene, seed in SCENES]
    captions = [c[0] for c in tiny_captioner.caption(images)]
    assert captions == [scene.caption for scene, _ in SCENES]
    return captions


def test_tiny_model_captions_with_the_bundled_config(tiny_captions, bundled) -> None:
    # The bundled phrase list has the emoji names "red circle" and "blue square" (with their
    # plurals) but no "yellow triangle" and no "... background": only listed phrases merge.
    assert [tags_for(c, bundled) for c in tiny_captions] == [
        ["red circle", "gray", "background"],
        ["blue square", "white", "background"],
        ["yellow", "triangle", "black", "background"],
    ]


@needs_reference
def test_tiny_model_captions_with_the_reference_config(tiny_captions, reference) -> None:
    # The upstream phrase list has no colour-shape phrases; its table knows "circle" but not
    # "square", so "squares" has no known singular to fold onto (nor an emoji).
    assert [tags_for(c, reference) for c in tiny_captions] == [
        ["red", "circle", "gray", "background"],
        ["blue", "squares", "white", "background"],
        ["yellow", "triangle", "black", "background"],
    ]


@needs_reference
@pytest.mark.parametrize(
    ("caption", "tags"),
    [
        ("a red fire hydrant sitting on the side of a road",
         ["red", "fire hydrant", "sitting", "road"]),
        ("a lot of teddy bears sitting on a shelf", ["teddy bear", "sitting", "shelf"]),
        ("a woman holding a cell phone in her hand", ["woman", "holding", "cell phone", "hand"]),
        ("a close up of a cat wearing glasses", ["cat", "wearing", "glasses"]),
        ("two dogs and a dog playing with frisbees in the park",
         ["dog", "playing", "frisbee", "park"]),
        ("the buses are parked in front of the buildings", ["buses", "parked", "building"]),
        ("two men in glasses standing next to a stop sign",
         ["men", "glasses", "standing", "stop sign"]),
    ],
)  # fmt: skip
def test_coco_style_captions_with_the_reference_config(
    reference: EmojiMapper, caption: str, tags: list[str]
) -> None:
    assert tags_for(caption, reference) == tags


# -- the rules, on small configs -------------------------------------------------------------


def small(mappings: dict[str, str], mwes: list[str]) -> EmojiMapper:
    return EmojiMapper(mappings, mwes)


def test_phrases_are_one_tag_and_their_words_are_not_repeated() -> None:
    m = small({"dog": "🐶"}, ["hot_dog", "ice_cream_cone"])
    assert tags_for("A hot dog, a dog and an ice cream cone.", m) == [
        "hot dog", "dog", "ice cream cone",
    ]  # fmt: skip


def test_function_phrases_are_dropped_and_inner_stop_words_kept() -> None:
    phrases = ["a_lot", "a_couple_of", "as_well", "close_up", "side_by_side", "cup_of_coffee"]
    m = small({"cat": "🐱"}, phrases)
    caption = "a close up of a lot of cats and a couple of dogs side by side with a cup of coffee"
    assert tags_for(caption, m) == ["cat", "dogs", "cup of coffee"]


def test_plurals_fold_only_onto_known_words() -> None:
    m = small({"circle": "⭕", "circles": "⭕", "red_circle": "🔴", "tree": "🌳"}, ["red_circle",
              "red_circles"])  # fmt: skip
    assert tags_for("red circles and circles with trees on grass", m) == [
        "red circle", "circle", "tree", "grass",  # "grass" is no plural of an unknown "gras"
    ]  # fmt: skip
    assert tags_for("bus", m) == ["bus"]  # 3 characters: never folded


def test_plurals_the_config_tells_apart_are_kept() -> None:
    m = small({"glass": "🍷", "new": "🆕", "news": "", "pant": "👖", "pants": "👖"}, [])
    # glasses/glass: the overrides map them to 👓 and 🥛; "news" is marked "no emoji"
    assert tags_for("glasses and a glass with news on pants", m) == [
        "glasses", "glass", "news", "pant",
    ]  # fmt: skip
    assert fold_plural("glasses", m) == "glasses" and fold_plural("pants", m) == "pant"


def test_folding_matches_the_emoji_mapping_plural_rule() -> None:
    m = small({"dog": "🐶"}, [])
    assert tags_for("dogs", m) == ["dog"] and m.map("dogs") == [{"emoji": "🐶", "word": "dogs"}]
    assert tags_for("men", m) == ["men"]  # irregular plurals are left alone, as in the mapping


def test_caption_order_and_no_duplicates_after_folding() -> None:
    m = small({"dog": "🐶", "cat": "🐱"}, [])
    assert tags_for("dogs chase a cat while a dog and the cats watch dogs", m) == [
        "dog", "chase", "cat", "watch",
    ]  # fmt: skip


def test_numbers_single_characters_and_punctuation_are_not_tags() -> None:
    m = small({}, [])
    assert tags_for('2 "bikes" - a b & 3 cars; number 7, (x) 3d', m) == [
        "bikes", "cars", "number", "3d",
    ]  # fmt: skip


@pytest.mark.parametrize("caption", ["", "   ", "a the of", "two three", ". , !"])
def test_nothing_to_tag(caption: str) -> None:
    assert tags_for(caption, small({"a": "🅰"}, [])) == []


def test_stop_words_are_lower_case_single_tokens_of_the_mapping() -> None:
    assert all(w == w.lower() and w.split() == [w] and "_" not in w for w in STOP_WORDS)
    assert {"a", "the", "on", "of", "two", "front", "top"} <= STOP_WORDS
    assert not {"background", "red", "circle", "man", "empty", "full", "sitting"} & STOP_WORDS


def test_tags_and_emoji_mappings_come_from_the_same_tokens(bundled: EmojiMapper) -> None:
    captions = [
        "a man riding a wave on top of a surfboard",
        "a group of people standing around a table with wine glasses",
        "two dogs playing with a frisbee in the park",
        "a red double decker bus driving down a city street",
    ]
    for caption in captions:
        tags = tags_for(caption, bundled)
        for mapping in bundled.map(caption):
            word = mapping["word"]
            if word.split("_")[0] not in STOP_WORDS and word.split("_")[-1] not in STOP_WORDS:
                assert fold_plural(word, bundled).replace("_", " ") in tags, (caption, word)


def test_called_with_the_config_store_snapshot(base_settings) -> None:
    store = EmojiConfigStore(base_settings)  # auto_update off: the bundled default
    store.load()
    try:
        mapper = store.mapper  # one snapshot for both fields of a prediction
        caption = "three red circles on a white background"
        prediction = {"text": caption, "emoji_mappings": mapper.map(caption)}
        prediction["tags"] = tags_for(caption, mapper)
        assert prediction["tags"] == ["red circle", "white", "background"]
        assert prediction["emoji_mappings"] == [{"emoji": "🔴", "word": "red_circles"}]
    finally:
        store.close()
