"""`caption`: caption folders, files, patterns and URL lists into JSON Lines, resumably.

    python caption.py photos/ --recursive --out captions.jsonl --num-captions 2 --tags

Runs the model in this process through the service's own pipeline (no server), or on a Ray
cluster with ``--ray``. The generation-option flags are made from the one options table
(captioning/options.py), so the CLI accepts exactly what the API accepts, with the same ranges
and messages. Settings come from the environment (and ``.env``) as for the service; the flags
below override them. See docs/bulk.md, "Command line" and "Ray".

Exit status: 0 when every input was captioned or already done; 1 when some failed (bad files,
downloads, arguments that match nothing) or the model could not be loaded; 2 for a usage
error; 130 when interrupted (a rerun resumes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bulk.cli_job import PROG, CliJob, JobError
from captioning.errors import InvalidOption
from captioning.options import OPTIONS, TAGS, GenerationOptions, OptionSpec
from settings import PRECISIONS, Settings, SettingsError

log = logging.getLogger(__name__)

#: flag dest → Settings field (Settings.with_flags applies the ones given).
SETTINGS_FLAGS = {
    "batch_size": "max_batch_size",
    "model_config": "model_config",
    "device": "device",
    "precision": "precision",
    "timeout": "request_timeout",
}
_OPTION_PREFIX = "option_"


# --------------------------------------------------------------------------- flags


def _range_text(spec: OptionSpec) -> str:
    if spec.kind is str:
        return f"at most {spec.max_chars} characters"
    low = "(" if spec.exclusive_minimum else "["
    if spec.kind is int:
        return f"{spec.minimum:g}-{spec.maximum:g}"
    return f"{low}{spec.minimum:g}, {spec.maximum:g}]"


def _option_type(spec: OptionSpec) -> Any:
    """argparse type: the option table's own parser, its message on a bad value."""

    def parse(raw: str) -> Any:
        try:
            return spec.parse(raw)
        except InvalidOption as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    parse.__name__ = spec.kind.__name__  # argparse names the type in its error
    return parse


def add_option_flag(group: argparse._ArgumentGroup, spec: OptionSpec) -> None:
    """One flag for one option-table row: ``--num-beams N``, ``--sampling/--no-sampling``."""
    flag = "--" + spec.name.replace("_", "-")
    dest = _OPTION_PREFIX + spec.name
    if spec.kind is bool:
        group.add_argument(
            flag,
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"{spec.help} (default: {'on' if spec.default else 'off'})",
        )
        return
    metavar = {int: "N", float: "X", str: "TEXT"}[spec.kind]
    default = f"{spec.default!r}" if spec.kind is str else f"{spec.default}"
    group.add_argument(
        flag,
        dest=dest,
        type=_option_type(spec),
        default=None,
        metavar=metavar,
        help=f"{spec.help}; {_range_text(spec)} (default: {default})",
    )


def build_parser(ray_address_default: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Caption images (folders, files, glob patterns, URLs, @lists of URLs or "
        "paths) into JSON Lines (or Parquet). A rerun skips images already in the output.",
        epilog="Exit status: 0 all captioned or already done; 1 some failed (listed on "
        "stderr); 2 usage error; 130 interrupted. Settings (MAX_FILE_SIZE, TIMEOUT, DEVICE, "
        "MODEL_CONFIG, ...) come from the environment and .env as for the service.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="a folder, an image file, a glob pattern (quote it), an http(s) URL, or @FILE: "
        "a text file with one URL or path per line",
    )
    out = parser.add_argument_group("input and output")
    out.add_argument(
        "-o",
        "--out",
        type=Path,
        metavar="FILE",
        default=Path("captions.jsonl"),
        help="output: JSON Lines, or Parquet when it ends in .parquet (default: captions.jsonl)",
    )
    out.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    out.add_argument(
        "--limit", type=_positive_int, metavar="N", help="caption at most N images this run"
    )
    out.add_argument(
        "--parquet", type=Path, metavar="FILE", help="also read inputs from a Parquet file ..."
    )
    out.add_argument("--column", metavar="NAME", help="... from this column of paths or URLs")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    out.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    model = parser.add_argument_group("model (override the environment)")
    model.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N",
        help="images per model batch (MAX_BATCH_SIZE)",
    )
    model.add_argument("--model-config", type=Path, metavar="YAML", help="MODEL_CONFIG")
    model.add_argument("--device", metavar="DEV", help="DEVICE: cpu, cuda, cuda:N (default: auto)")
    model.add_argument("--precision", choices=PRECISIONS, help="PRECISION")
    model.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="per image (REQUEST_TIMEOUT)"
    )
    options = parser.add_argument_group("generation options (the API's, same ranges)")
    for spec in (*OPTIONS, TAGS):
        add_option_flag(options, spec)
    ray = parser.add_argument_group("Ray (needs the `ray` dependency group)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data with an actor pool")
    ray.add_argument(
        "--ray-address",
        default=ray_address_default,
        metavar="ADDR",
        help="an existing cluster (default: RAY_ADDRESS, else an embedded local Ray)",
    )
    ray.add_argument(
        "--actors",
        type=_positive_int,
        metavar="N",
        help="Captioner actors (default: one per GPU, else 1)",
    )
    ray.add_argument(
        "--num-gpus",
        type=_non_negative_float,
        metavar="G",
        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
    )
    ray.add_argument(
        "--ray-object-store-mb",
        type=_positive_int,
        default=256,
        metavar="MB",
        help="object store of the embedded Ray (default: 256)",
    )
    return parser


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _batch_size(raw: str) -> int:
    value = _positive_int(raw)
    if value > 256:
        raise argparse.ArgumentTypeError("must be at most 256")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def generation_options(args: argparse.Namespace) -> tuple[GenerationOptions, bool]:
    """The options and the tags flag given on the command line (InvalidOption when they
    do not fit together, e.g. --num-captions above --num-beams)."""
    given = {
        spec.name: getattr(args, _OPTION_PREFIX + spec.name)
        for spec in OPTIONS
        if getattr(args, _OPTION_PREFIX + spec.name) is not None
    }
    return GenerationOptions.from_public(given), bool(getattr(args, _OPTION_PREFIX + TAGS.name))


# --------------------------------------------------------------------------- run


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The CLI; `environ` is the environment settings are read from (default: os.environ)."""
    env = os.environ if environ is None else environ
    parser = build_parser(env.get("RAY_ADDRESS") or None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)  # library deprecation noise: shown with --verbose only
    logging.getLogger("py.warnings").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if not args.inputs and args.parquet is None:
        parser.error("give at least one INPUT (or --parquet FILE --column NAME)")
    if (args.parquet is None) != (args.column is None):
        parser.error("--parquet and --column go together")
    try:
        options, tags = generation_options(args)
        settings = Settings.from_env(env).with_flags(args, **SETTINGS_FLAGS)
    except InvalidOption as exc:
        parser.error(exc.message)
    except SettingsError as exc:
        parser.error(str(exc))
    job = CliJob(args, settings, options, tags)
    try:
        return job.run()
    except JobError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
