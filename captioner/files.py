"""Which model the settings name, and fetching its files into MODEL_DIR (first runs, air gaps).

    python blip2_model.py download [--model-dir D] [--checkpoint-url U] [--tokenizer-url U]

`MODEL_CONFIG` names a local model folder (its `arch` says the family); otherwise MODEL_NAME /
MODEL_TYPE name a LAVIS zoo model: `blip_caption` (BLIP v1) or `blip2_opt` / `blip2_t5` (BLIP-2),
whose files live under MODEL_DIR as captioner/blip2_spec.py lays them out.

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
from captioner.blip2_spec import (
    ARCHS,
    Blip2Spec,
    lavis_blip2_spec,
    yaml_blip2_spec,
    zoo_files,
)
from captioner.spec import (
    TOKENIZER_FILES,
    ModelError,
    ModelFilesMissing,
    ModelSpec,
    lavis_spec,
    read_model_yaml,
    yaml_spec,
)

if TYPE_CHECKING:
    from settings import Settings

log = logging.getLogger(__name__)

DOWNLOAD_CONNECT_TIMEOUT = 10.0
DOWNLOAD_READ_TIMEOUT = 60.0


AnySpec = ModelSpec | Blip2Spec


def _zoo_files(spec: Blip2Spec, settings: Settings) -> list[tuple[str, Path, int]]:
    return zoo_files(
        spec,
        settings.model_dir,
        bert_url=settings.tokenizer_url,
        hub_url=settings.hub_url,
        bucket_url=settings.blip2_checkpoint_base_url,
    )


def model_files(spec: AnySpec, settings: Settings) -> list[tuple[str, Path]]:
    """(source URL, destination) for every file of a LAVIS zoo model."""
    if isinstance(spec, Blip2Spec):
        return [(url, dest) for url, dest, _size in _zoo_files(spec, settings)]
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
    spec: AnySpec,
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


def _expected_files(spec: AnySpec, settings: Settings) -> str:
    if isinstance(spec, Blip2Spec):
        sized = [
            f"{dest.relative_to(settings.model_dir)}"
            + (f" (~{size / 1e9:.1f} GB)" if size > 1e8 else "")
            for _url, dest, size in _zoo_files(spec, settings)
        ]
        return "Expected under MODEL_DIR: " + ", ".join(sized) + "."
    assert spec.checkpoint is not None
    return (
        f"Expected: the LAVIS checkpoint ({spec.checkpoint.name}, ~1.8 GB) and the "
        f"bert-base-uncased tokenizer ({', '.join(TOKENIZER_FILES)}) in {spec.tokenizer_dir}."
    )


def missing_files_message(spec: AnySpec, settings: Settings, cause: str | None) -> str:
    missing = missing_zoo_files(spec, settings)
    lines = [
        f"Model files for {spec.name} are missing from MODEL_DIR={settings.model_dir}:",
        *[f"  - {p}" for p in missing],
        _expected_files(spec, settings),
        "Fetch them on a machine with internet and copy the folder here:",
        f"  MODEL_DIR={settings.model_dir} MODEL_NAME={settings.model_name} "
        f"MODEL_TYPE={settings.model_type} python blip2_model.py download",
        "or set MODEL_CONFIG to a local model.yaml (e.g. models/tiny-shapes/model.yaml).",
    ]
    if cause:
        lines.insert(1, f"Automatic download failed: {cause}")
    return "\n".join(lines)


def missing_zoo_files(spec: AnySpec, settings: Settings) -> list[Path]:
    """What must be fetched before a zoo model loads: for BLIP-2 every file of its table (the
    language model's weights included), for BLIP v1 the checkpoint and the tokenizer's vocab."""
    if isinstance(spec, Blip2Spec):
        return [dest for _url, dest in model_files(spec, settings) if not dest.is_file()]
    return spec.missing_files()


def zoo_spec(settings: Settings) -> AnySpec:
    """The spec of the LAVIS zoo model MODEL_NAME/MODEL_TYPE with files in MODEL_DIR."""
    if settings.model_name in ARCHS:
        return lavis_blip2_spec(settings.model_name, settings.model_type, settings.model_dir)
    return lavis_spec(settings.model_name, settings.model_type, settings.model_dir)


def local_spec(path: Path) -> AnySpec:
    """The spec of a local model folder: its YAML's `arch` says the family (BLIP v1 default)."""
    raw = read_model_yaml(path)
    if raw.get("arch") in ARCHS:
        return yaml_blip2_spec(path, raw)
    return yaml_spec(path, raw)


def configured_name(settings: Settings) -> str:
    """The configured model's name without loading or fetching anything (OpenAPI, logs)."""
    if settings.model_config is not None:
        try:
            return local_spec(settings.model_config).name
        except ModelError:
            return str(settings.model_config)
    return f"{settings.model_name}/{settings.model_type}"


def configured_spec(settings: Settings) -> AnySpec:
    """The spec of the configured model (MODEL_CONFIG, else MODEL_NAME/MODEL_TYPE in MODEL_DIR),
    with its files present: downloaded on first use when MODEL_DOWNLOAD allows, else an error
    that says what to fetch and how."""
    if settings.model_config is not None:
        spec = local_spec(settings.model_config)
        if spec.missing_files():
            raise ModelFilesMissing(
                f"MODEL_CONFIG {settings.model_config} names files that do not exist: "
                + ", ".join(str(p) for p in spec.missing_files())
            )
        return spec
    spec = zoo_spec(settings)
    if missing_zoo_files(spec, settings):
        cause = None if settings.model_download else "disabled (MODEL_DOWNLOAD=false)"
        if settings.model_download:
            try:
                download_model(spec, settings)
            except Exception as exc:  # no network, HTTP error, disk full
                cause = f"{type(exc).__name__}: {exc}"
        if missing_zoo_files(spec, settings):
            raise ModelFilesMissing(missing_files_message(spec, settings, cause))
    return spec


def cli_download(args: argparse.Namespace, settings: Settings) -> int:
    """`python blip2_model.py download`: fetch what is missing, print the SHA-256 of each file."""
    settings = settings.with_flags(
        args,
        model_dir="model_dir",
        model_name="model_name",
        model_type="model_type",
        checkpoint_url="checkpoint_url",
        tokenizer_url="tokenizer_url",
    )
    expected = dict(item.split("=", 1) for item in args.sha256)
    try:
        spec = zoo_spec(settings)
    except ModelError as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 2
    try:
        sums = download_model(spec, settings, expected=expected)
    except Exception as exc:
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for rel, sha in sums.items():
        print(f"{sha}  {rel}")
    if missing_zoo_files(spec, settings):
        print(missing_files_message(spec, settings, None), file=sys.stderr)
        return 1
    print(f"model files are complete in {settings.model_dir}")
    return 0


def add_download_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dl = sub.add_parser("download", help="fetch every file of MODEL_NAME/MODEL_TYPE into MODEL_DIR")
    dl.add_argument("--model-dir", type=Path, help="overrides MODEL_DIR")
    dl.add_argument("--model-name", help="overrides MODEL_NAME (blip_caption, blip2_opt, blip2_t5)")
    dl.add_argument("--model-type", help="overrides MODEL_TYPE (e.g. caption_coco_opt2.7b)")
    dl.add_argument("--checkpoint-url", help="overrides CHECKPOINT_URL")
    dl.add_argument("--tokenizer-url", help="overrides TOKENIZER_URL (a folder URL)")
    dl.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX")
