"""The bundled default config: derived from the `emoji` package only, up to date, usable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from emoji_config import EmojiMapper
from emoji_config.loader import BUNDLED_DIR
from emoji_config.validate import parse_mappings, parse_mwe

SCRIPT = ROOT / "scripts" / "build_emoji_config.py"


@pytest.fixture(scope="module")
def bundled() -> EmojiMapper:
    table = parse_mappings((BUNDLED_DIR / "emoji_mappings.json").read_bytes())
    phrases = parse_mwe((BUNDLED_DIR / "mwe.txt").read_bytes())
    return EmojiMapper(table, phrases)


def test_committed_files_are_exactly_the_script_output() -> None:
    """So the default is derived from the `emoji` package and nothing else."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr.decode()


def test_check_notices_a_hand_edit(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, timeout=60)
    table = json.loads((tmp_path / "emoji_mappings.json").read_text(encoding="utf-8"))
    table["dog"] = "🐺"
    (tmp_path / "emoji_mappings.json").write_text(json.dumps(table), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--check"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1 and b"emoji_mappings.json" in done.stderr


def test_size(bundled: EmojiMapper) -> None:
    assert bundled.mappings_count > 2000
    assert bundled.mwes_count > 2000


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("two dogs playing with a frisbee in the park", {"dogs", "frisbee", "park"}),
        ("a young boy brushing his teeth with a toothbrush", {"boy", "teeth", "toothbrush"}),
        ("a surfer riding waves at sunset", {"surfer", "waves", "sunset"}),
        ("a fire engine parked on the street", {"fire_engine", "street"}),
        ("two fire engines and three buses", {"fire_engines", "buses"}),
        ("a red fire hydrant next to a stop sign", {"stop_sign"}),
        ("men and women with their children", {"men", "women", "children"}),
        ("foxes eating peaches", {"foxes", "peaches"}),
        ("a hot dog on a plate", {"hot_dog", "plate"}),
        ("a man running on the beach", {"man_running", "beach"}),
        ("a woman running", {"woman_running"}),
        ("a dog running", {"dog", "running"}),
    ],
)
def test_everyday_captions_map_to_their_nouns(
    bundled: EmojiMapper, caption: str, expected: set[str]
) -> None:
    assert {m["word"] for m in bundled.map(caption)} == expected


def test_function_words_and_letters_never_map(bundled: EmojiMapper) -> None:
    caption = "a an the on in up top back end new free cool ok one two us it of at b o m x"
    assert bundled.map(caption) == []
