"""`python -m emoji_config`: map captions read from stdin, one JSON line per caption.

With `--mappings` and `--mwe` the given files are used (any caption gives what the reference
gives with the same files); without them, the config the service would load (download, cache or
bundled default, per the environment and `.env`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from emoji_config.mapper import EmojiMapper
from emoji_config.validate import ConfigError, parse_mappings, parse_mwe


def _mapper_from_files(mappings: Path, mwe: Path) -> EmojiMapper:
    return EmojiMapper(parse_mappings(mappings.read_bytes()), parse_mwe(mwe.read_bytes()))


def _mapper_from_service_config(offline: bool) -> EmojiMapper:
    from emoji_config.loader import EmojiConfigStore
    from settings import Settings

    settings = Settings.from_env()
    if offline:
        settings = settings.with_overrides(auto_update=False)
    store = EmojiConfigStore(settings)
    store.load()
    health = store.health()
    logging.getLogger(__name__).info(
        "using %s config (%s mappings, %s phrases)",
        health["source"],
        health["mappings"],
        health["mwes"],
    )
    return store.mapper


def run(mapper: EmojiMapper, lines: Iterable[bytes], out: BinaryIO) -> None:
    """Write one JSON list per input line (UTF-8 in, UTF-8 out, whatever the locale)."""
    for raw in lines:
        caption = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        out.write(json.dumps(mapper.map(caption), ensure_ascii=False).encode() + b"\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emoji_config",
        description="Map captions (one per line on stdin) to emojis; one JSON list per line.",
    )
    parser.add_argument("--mappings", type=Path, help="emoji_mappings.json to use")
    parser.add_argument("--mwe", type=Path, help="mwe.txt to use")
    parser.add_argument(
        "--offline", action="store_true", help="without the flags: skip the download"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    args = parser.parse_args(argv)
    if (args.mappings is None) != (args.mwe is None):
        parser.error("--mappings and --mwe go together")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.mappings is not None:
            mapper = _mapper_from_files(args.mappings, args.mwe)
        else:
            mapper = _mapper_from_service_config(args.offline)
    except (OSError, ConfigError) as exc:
        print(f"python -m emoji_config: {exc}", file=sys.stderr)
        return 2
    try:
        run(mapper, sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
