#!/usr/bin/env python3
"""How fast the emoji mapper is: building the phrase structure, and mapping one caption.

Targets (issue 4): mapping a 20-word caption < 1 ms; building the MWE structure from the
65,000-line reference list < 2 s. Uses ../shared/reference-config when present, and the bundled
default always. Prints a readable report; the last line is JSON.

Usage: `python benchmarks/emoji_speed.py [--reference-dir DIR] [--repeat N]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_support import describe, machine  # noqa: E402

from emoji_config.loader import BUNDLED_DIR  # noqa: E402
from emoji_config.mapper import EmojiMapper  # noqa: E402
from emoji_config.validate import parse_mappings, parse_mwe  # noqa: E402

CAPTION = (
    "a young boy and two dogs playing with a red frisbee in the park near a fire engine at sunset"
)
assert len(CAPTION.split()) == 20


def measure(name: str, directory: Path, repeat: int) -> dict[str, Any]:
    """Parse + build times (best and median of `repeat`) and the per-caption map time."""
    raw_table = (directory / "emoji_mappings.json").read_bytes()
    raw_mwe = (directory / "mwe.txt").read_bytes()
    parse, build = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        table, lines = parse_mappings(raw_table), parse_mwe(raw_mwe)
        parsed = time.perf_counter()
        mapper = EmojiMapper(table, lines)
        built = time.perf_counter()
        parse.append(parsed - started)
        build.append(built - parsed)
    calls = 20_000
    runs = timeit.repeat(lambda: mapper.map(CAPTION), number=calls, repeat=5)
    return {
        "config": name,
        "mwe_lines": mapper.mwes_count,
        "mappings": mapper.mappings_count,
        "parse_s_best": min(parse),
        "parse_s_median": statistics.median(parse),
        "mwe_build_s_best": min(build),
        "mwe_build_s_median": statistics.median(build),
        "map_20_words_us_best": min(runs) / calls * 1e6,
        "map_20_words_us_median": statistics.median(runs) / calls * 1e6,
        "mapped": mapper.map(CAPTION),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--reference-dir", type=Path, default=ROOT.parent / "shared" / "reference-config"
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    started = time.perf_counter()
    EmojiMapper({}, [])  # first mapper imports NLTK
    import_s = time.perf_counter() - started
    configs = [("bundled", BUNDLED_DIR)]
    if (args.reference_dir / "mwe.txt").is_file():
        configs.insert(0, ("reference", args.reference_dir))
    else:
        print(f"note: no reference config in {args.reference_dir}; bundled only")
    results = [measure(name, directory, args.repeat) for name, directory in configs]

    import nltk

    info = machine()
    print(describe(info))
    print(f"nltk {nltk.__version__}; NLTK import {import_s * 1000:.0f} ms")
    print(f"caption ({len(CAPTION.split())} words): {CAPTION!r}")
    for r in results:
        print(
            f"{r['config']:>9}: {r['mwe_lines']} phrases, {r['mappings']} words | "
            f"parse {r['parse_s_median'] * 1000:.0f} ms | "
            f"MWE build {r['mwe_build_s_median'] * 1000:.0f} ms "
            f"(best {r['mwe_build_s_best'] * 1000:.0f}) | "
            f"map {r['map_20_words_us_median']:.1f} us (best {r['map_20_words_us_best']:.1f})"
        )
    print(json.dumps({"machine": info, "nltk_import_s": import_s, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
