#!/usr/bin/env python3
"""The GPU kit's build steps that are easier in Python than in shell (build.sh drives them).

Why a kit at all: a lent GPU machine has its own Python 3.12 stack (torch, transformers 5, ...),
reaches no package registry and can receive at most 64 MiB. Our pins (transformers 4.25.1,
LAVIS 1.0.2, timm 0.4.12, ...) are pure Python, so they travel as unpacked wheels beside a shim
(docs/gpu.md). This module turns packages.txt and the lock into pins, makes the unpacked wheels
pure Python (compiled speed-ups stripped where a Python fallback exists, anything else refused),
prunes transformers to what the captioning path imports, and checks the size limit.

    kit_build.py pins LAYER               name==version lines of one layer, from the lock
    kit_build.py finish KIT               strip, prune, check purity, write manifest, check size
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LOCK = ROOT / "requirements.installed.txt"
PACKAGES = HERE / "packages.txt"
IMAGE_VERSIONS = HERE / "image_versions.txt"
LIMIT_BYTES = 64 * 2**20
BINARY_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")

# transformers model packages the captioning path imports (LAVIS 1.0.2 imports BERT, OPT, T5,
# GPT-2 and the auto classes at `import lavis`; measured with the project's environment). Every
# other model keeps its __init__.py and configuration_*.py, which transformers/models/__init__.py
# and the auto mappings need; their modeling and tokenization files are left out.
KEEP_MODELS = ("auto", "bert", "encoder_decoder", "gpt2", "opt", "t5")


@dataclass(frozen=True)
class Package:
    """One line of packages.txt."""

    name: str
    layer: str  # "site" or "fallback"
    strip: bool  # compiled speed-ups are deleted (a pure-Python fallback exists)


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_packages(path: Path = PACKAGES) -> list[Package]:
    out = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        if len(line) not in (2, 3) or line[1] not in ("site", "fallback"):
            raise SystemExit(f"{path}: cannot read {raw!r} (want: name site|fallback [strip])")
        if len(line) == 3 and line[2] != "strip":
            raise SystemExit(f"{path}: third column must be 'strip', got {line[2]!r}")
        out.append(Package(normalize(line[0]), line[1], len(line) == 3))
    return out


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """name -> version from `name==version [; marker]` lines (uv export)."""
    pins = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", raw.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def pins(layer: str, packages: list[Package], lock: dict[str, str]) -> list[str]:
    missing = [p.name for p in packages if p.layer == layer and p.name not in lock]
    if missing:
        raise SystemExit(f"not in {LOCK.name}: {', '.join(missing)} (packages.txt out of date?)")
    return [f"{p.name}=={lock[p.name]}" for p in packages if p.layer == layer]


# --------------------------------------------------------------------------- purity


def dist_infos(layer_dir: Path) -> dict[str, Path]:
    """normalized name -> its .dist-info folder."""
    out = {}
    for info in layer_dir.glob("*.dist-info"):
        out[normalize(info.name.removesuffix(".dist-info").rsplit("-", 1)[0])] = info
    return out


def owned_files(info: Path) -> list[Path]:
    """Files a dist-info's RECORD lists (paths relative to the layer folder)."""
    record = info / "RECORD"
    if not record.is_file():
        return []
    base = info.parent
    return [base / line.split(",", 1)[0] for line in record.read_text().splitlines() if line]


def strip_binaries(layer_dir: Path, packages: list[Package]) -> list[str]:
    """Delete compiled modules of the packages marked `strip`; names of the files removed."""
    infos = dist_infos(layer_dir)
    removed = []
    for pkg in packages:
        if not pkg.strip or pkg.name not in infos:
            continue
        for path in owned_files(infos[pkg.name]):
            if path.suffix in BINARY_SUFFIXES and path.is_file():
                path.unlink()
                removed.append(str(path.relative_to(layer_dir)))
    return removed


def binaries(kit: Path) -> list[str]:
    return sorted(
        str(p.relative_to(kit))
        for p in kit.rglob("*")
        if p.is_file() and (p.suffix in BINARY_SUFFIXES or ".so." in p.name)
    )


def impure_wheels(layer_dir: Path) -> list[str]:
    """Distributions whose WHEEL says they are not pure Python (after stripping, each is a
    stripped package; anything else slipping in is an error the build reports)."""
    out = []
    for name, info in dist_infos(layer_dir).items():
        wheel = (info / "WHEEL").read_text() if (info / "WHEEL").is_file() else ""
        if "Root-Is-Purelib: true" not in wheel:
            out.append(name)
    return sorted(out)


# --------------------------------------------------------------------------- pruning


def prune_transformers(site: Path, keep: tuple[str, ...] = KEEP_MODELS) -> list[str]:
    """Remove transformers files the captioning path never imports; the module names removed.

    TensorFlow and Flax modeling files (the kit runs torch only; run.sh sets USE_TF=0 and
    USE_FLAX=0), conversion scripts, and the modeling/tokenization files of models not in `keep`.
    """
    pkg = site / "transformers"
    if not pkg.is_dir():
        raise SystemExit(f"{pkg} missing: did the install step fail?")
    models = pkg / "models"
    removed = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(site)
        name = path.stem
        parts = rel.parts
        in_model = len(parts) >= 4 and parts[1] == "models"
        other_model = in_model and parts[2] not in keep
        drop = name.startswith(("modeling_tf_", "modeling_flax_", "convert_")) or (
            other_model and name != "__init__" and not name.startswith("configuration_")
        )
        if drop:
            path.unlink()
            removed.append(".".join(rel.with_suffix("").parts))
    if not (models / "bert" / "modeling_bert.py").is_file():
        raise SystemExit("pruning removed transformers' BERT: KEEP_MODELS is wrong")
    return removed


def drop_caches(kit: Path) -> None:
    for cache in list(kit.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


# --------------------------------------------------------------------------- manifest, size


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def carry_bytes(path: Path) -> int:
    """What moving the folder costs, as tar counts it: a 512-byte header per entry and each
    file padded to 512 bytes (a little more than the files' own bytes: ~2,900 small files)."""
    total = 0
    for p in path.rglob("*"):
        total += 512
        if p.is_file() and not p.is_symlink():
            total += -(-p.stat().st_size // 512) * 512
    return total


def read_image_versions(path: Path = IMAGE_VERSIONS) -> dict[str, str]:
    """The host stack the kit was rehearsed with: `name version` lines."""
    out = {}
    if path.is_file():
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.split("#", 1)[0].split()
            if len(line) == 2:
                out[normalize(line[0])] = line[1]
    return out


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def write_manifest(kit: Path, packages: list[Package], lock: dict[str, str], pruned: int) -> dict:
    parts = {p.name: tree_bytes(p) for p in sorted(kit.iterdir()) if p.is_dir()}
    total = tree_bytes(kit)
    manifest = {
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "build_python": sys.version.split()[0],
        "layers": {
            layer: {p.name: lock[p.name] for p in packages if p.layer == layer}
            for layer in ("site", "fallback")
        },
        "stubs": sorted(p.name for p in (kit / "stubs").iterdir() if not p.name.startswith("_")),
        "transformers_models_kept": list(KEEP_MODELS),
        "transformers_modules_pruned": pruned,
        "rehearsed_host": read_image_versions(),
        "bytes": {"total": total, **parts},
        "carry_bytes": carry_bytes(kit),
        "limit_bytes": LIMIT_BYTES,
    }
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def finish(kit: Path) -> int:
    packages = read_packages()
    lock = read_lock()
    for layer in ("site", "fallback"):
        for name in strip_binaries(kit / layer, packages):
            print(f"stripped {layer}/{name} (pure-Python fallback in the package)")
    pruned = prune_transformers(kit / "site")
    (kit / "shim" / "pruned.txt").write_text("\n".join(pruned) + "\n", encoding="utf-8")
    print(f"pruned {len(pruned)} transformers modules (kept models: {', '.join(KEEP_MODELS)})")
    drop_caches(kit)
    problems = binaries(kit)
    for layer in ("site", "fallback"):
        stripped = {p.name for p in packages if p.strip}
        problems += [
            f"{layer}: {n} is not pure Python"
            for n in impure_wheels(kit / layer)
            if n not in stripped
        ]
    if problems:
        print("GPU kit is not pure Python:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    manifest = write_manifest(kit, packages, lock, len(pruned))
    total, carry = manifest["bytes"]["total"], manifest["carry_bytes"]
    sizes = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in manifest["bytes"].items() if k != "total")
    print(
        f"kit size {total / 2**20:.1f} MiB of files, {carry / 2**20:.1f} MiB to carry (as tar); "
        f"limit {LIMIT_BYTES / 2**20:.0f} MiB ({sizes} MiB)"
    )
    if carry > LIMIT_BYTES:
        print(
            f"GPU kit is {carry / 2**20:.1f} MiB to carry, over the {LIMIT_BYTES / 2**20:.0f} MiB "
            "that can be carried to a GPU machine",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pins", help="name==version lines of one layer")
    p.add_argument("layer", choices=["site", "fallback"])
    f = sub.add_parser("finish", help="strip, prune, check, manifest, size")
    f.add_argument("kit", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pins":
        print("\n".join(pins(args.layer, read_packages(), read_lock())))
        return 0
    return finish(args.kit)


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
