"""Fetching the real model's files into MODEL_DIR, for first runs and air-gapped deploys.

    python blip2_model.py download [--model-dir D] [--checkpoint-url U] [--tokenizer-url U]

Each file is streamed to a temporary file beside its destination and renamed into place only when
complete (and, when a SHA-256 is expected, only when it matches); `SHA256SUMS` in MODEL_DIR
records what was fetched.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bounded_io import atomic_file
from model_spec import (
    LARGE_COCO_CHECKPOINT,
    TOKENIZER_DIRNAME,
    TOKENIZER_FILES,
    ModelError,
    ModelFilesMissing,
    ModelSpec,
    lavis_spec,
    yaml_spec,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

DOWNLOAD_CONNECT_TIMEOUT = 10.0
DOWNLOAD_READ_TIMEOUT = 60.0


def model_files(spec: ModelSpec, settings: Settings) -> list[tuple[str, Path]]:
    """(source URL, destination) for every file of a LAVIS zoo model."""
    base = settings.tokenizer_url.rstrip("/") + "/"
    files = [(base + name, spec.tokenizer_dir / name) for name in TOKENIZER_FILES]
    if spec.checkpoint is not None:
        files.append((settings.checkpoint_url, spec.checkpoint))
    return files


def download_file(
    url: str, dest: Path, *, expected_sha256: str | None = None, progress: bool = True
) -> str:
    """Stream `url` to `dest` atomically; return its SHA-256 (checked when one is expected)."""
    import requests
    from tqdm import tqdm

    digest = hashlib.sha256()
    with (
        atomic_file(dest) as out,
        requests.get(
            url, stream=True, timeout=(DOWNLOAD_CONNECT_TIMEOUT, DOWNLOAD_READ_TIMEOUT)
        ) as resp,
    ):
        resp.raise_for_status()
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=dest.name,
            disable=not progress,
            file=sys.stderr,
        ) as bar:
            for chunk in resp.iter_content(chunk_size=1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        sha = digest.hexdigest()
        if expected_sha256 and sha != expected_sha256.lower():  # raising leaves dest untouched
            raise ModelError(f"{dest.name}: SHA-256 {sha} does not match {expected_sha256}")
    return sha


def download_model(
    spec: ModelSpec,
    settings: Settings,
    *,
    progress: bool = True,
    expected: dict[str, str] | None = None,
) -> dict[str, str]:
    """Fetch every missing file of `spec` into MODEL_DIR and record SHA256SUMS there."""
    sums: dict[str, str] = {}
    for url, dest in model_files(spec, settings):
        rel = dest.relative_to(settings.model_dir).as_posix()
        if dest.is_file():
            continue
        log.info("downloading %s -> %s", url, dest)
        sums[rel] = download_file(
            url, dest, expected_sha256=(expected or {}).get(rel), progress=progress
        )
    if sums:
        sums_file = settings.model_dir / "SHA256SUMS"
        old = sums_file.read_text(encoding="utf-8") if sums_file.is_file() else ""
        lines = [ln for ln in old.splitlines() if ln.strip() and ln.split()[-1] not in sums]
        lines += [f"{sha}  {rel}" for rel, sha in sums.items()]
        sums_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sums


def missing_files_message(spec: ModelSpec, settings: Settings, cause: str | None) -> str:
    missing = spec.missing_files()
    lines = [
        f"Model files for {spec.name} are missing from MODEL_DIR={settings.model_dir}:",
        *[f"  - {p}" for p in missing],
        "Expected: the LAVIS checkpoint "
        f"({LARGE_COCO_CHECKPOINT}, ~1.8 GB) and the bert-base-uncased tokenizer "
        f"({', '.join(TOKENIZER_FILES)}) in {settings.model_dir / TOKENIZER_DIRNAME}.",
        "Fetch them on a machine with internet and copy the folder here:",
        f"  MODEL_DIR={settings.model_dir} python blip2_model.py download",
        "or set MODEL_CONFIG to a local model.yaml (e.g. models/tiny-shapes/model.yaml).",
    ]
    if cause:
        lines.insert(1, f"Automatic download failed: {cause}")
    return "\n".join(lines)


def configured_spec(settings: Settings) -> ModelSpec:
    """The spec of the configured model (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE in MODEL_DIR),
    with its files present: downloaded on first use when MODEL_DOWNLOAD allows, else an error
    that says what to fetch and how."""
    if settings.model_config is not None:
        spec = yaml_spec(settings.model_config)
        if spec.missing_files():
            raise ModelFilesMissing(
                f"MODEL_CONFIG {settings.model_config} names files that do not exist: "
                + ", ".join(str(p) for p in spec.missing_files())
            )
        return spec
    spec = lavis_spec(settings.model_name, settings.model_type, settings.model_dir)
    if spec.missing_files():
        cause = None if settings.model_download else "disabled (MODEL_DOWNLOAD=false)"
        if settings.model_download:
            try:
                download_model(spec, settings)
            except Exception as exc:  # no network, HTTP error, disk full
                cause = f"{type(exc).__name__}: {exc}"
        if spec.missing_files():
            raise ModelFilesMissing(missing_files_message(spec, settings, cause))
    return spec


def cli_download(args: argparse.Namespace, settings: Settings) -> int:
    """`python blip2_model.py download`: fetch what is missing, print the SHA-256 of each file."""
    settings = settings.with_flags(
        args, model_dir="model_dir", checkpoint_url="checkpoint_url", tokenizer_url="tokenizer_url"
    )
    expected = dict(item.split("=", 1) for item in args.sha256)
    spec = lavis_spec(settings.model_name, settings.model_type, settings.model_dir)
    try:
        sums = download_model(spec, settings, expected=expected)
    except Exception as exc:
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for rel, sha in sums.items():
        print(f"{sha}  {rel}")
    if spec.missing_files():
        print(missing_files_message(spec, settings, None), file=sys.stderr)
        return 1
    print(f"model files are complete in {settings.model_dir}")
    return 0


def add_download_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dl = sub.add_parser("download", help="fetch the checkpoint and tokenizer into MODEL_DIR")
    dl.add_argument("--model-dir", type=Path, help="overrides MODEL_DIR")
    dl.add_argument("--checkpoint-url", help="overrides CHECKPOINT_URL")
    dl.add_argument("--tokenizer-url", help="overrides TOKENIZER_URL (a folder URL)")
    dl.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX")
