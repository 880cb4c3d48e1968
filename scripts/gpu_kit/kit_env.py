#!/usr/bin/env python3
"""How the GPU kit meets this host: expected vs found versions, which copy wins, do imports work.

Why: the kit was rehearsed against one host stack (image_versions.txt, written from the
rehearsal environment); a GPU image or a notebook will differ somewhere. Naming each difference
up front turns a later failure from a mystery into a line of this table. It also proves the
layering: our pinned packages must be the ones imported (not the host's transformers 5), the Rust
tokenizers must be hidden, and the whole captioning and service import chain must load.

    kit_env.py --out DIR     writes DIR/env.txt, DIR/env.json and DIR/versions-differ.txt;
                             exit 1 when an import fails or a pinned package is not ours
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import sys
import traceback
from pathlib import Path

KIT = Path(os.environ.get("GPU_KIT", Path(__file__).resolve().parents[3]))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kit_build import normalize, read_image_versions, read_packages  # noqa: E402

# What a kit run imports, in the order a failure is easiest to read.
IMPORTS = (
    "numpy",
    "torch",
    "torchvision",
    "PIL",
    "yaml",
    "regex",
    "transformers",
    "transformers.models.bert.tokenization_bert",
    "huggingface_hub",
    "timm",
    "omegaconf",
    "fairscale",
    "lavis",
    "blip2_model",
    "captioner.fast_decode",
    "captioner.doctor",
    "flask",
    "waitress",
    "nltk.tokenize.mwe",
    "REST",
    "captioning.runtime",
    "pytest",
    "requests",
)


def host_versions() -> dict[str, str]:
    """Distributions installed on the host itself (the kit's folders left out)."""
    kit = str(KIT.resolve())
    paths = [p for p in sys.path if p and not os.path.realpath(p).startswith(kit)]
    out = {}
    for dist in md.distributions(path=paths):
        name = dist.metadata["Name"]
        if name and normalize(name) not in out:
            out[normalize(name)] = dist.version
    return out


def kit_versions() -> dict[str, tuple[str, str]]:
    """name -> (layer, version) for what the kit carries."""
    manifest = json.loads((KIT / "manifest.json").read_text(encoding="utf-8"))
    return {
        name: (layer, version)
        for layer, pins in manifest["layers"].items()
        for name, version in pins.items()
    }


def difference_note(name: str, found: str, layer: str | None) -> str:
    """What a version difference means for a kit run."""
    if name == "tokenizers":
        return "hidden by the shim"
    if layer == "site":
        return "shadowed by the kit"
    if found == "-":
        return "the kit's fallback copy is used" if layer == "fallback" else "absent here"
    return "used as found"


def table(
    rehearsed: dict[str, str],
    host: dict[str, str],
    carried: dict[str, tuple[str, str]],
    layers: dict[str, str],
) -> tuple[list[str], list[str]]:
    """The expected-vs-found table, and the lines naming each difference. `carried`: name ->
    (layer, version) the kit holds; `layers`: name -> layer from packages.txt."""
    names = sorted(set(rehearsed) | set(carried))
    rows = [("package", "rehearsed host", "this host", "kit", "used")]
    differ = []
    for name in names:
        want, found = rehearsed.get(name, "-"), host.get(name, "-")
        layer, ours = carried.get(name, ("", "-"))
        if layer == "site" or (layer == "fallback" and found == "-"):
            used = f"kit {ours}"
        else:
            used = f"host {found}" if found != "-" else "absent"
        rows.append((name, want, found, f"{ours} ({layer})" if layer else "-", used))
        if name in rehearsed and want != found:
            note = difference_note(name, found, layers.get(name))
            has = f"this host has {found}" if found != "-" else "this host has none"
            differ.append(f"{name}: rehearsed with {want}, {has} ({note})")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return lines, differ


def import_checks() -> tuple[list[str], list[str]]:
    """Import the chain; lines describing each module, and the problems found."""
    lines, problems = [], []
    for name in IMPORTS:
        try:
            if name == "lavis":
                import blip2_model

                blip2_model.import_lavis()
            module = importlib.import_module(name)
        except BaseException as exc:  # report everything, SystemExit from a bad import included
            problems.append(f"import {name} failed: {type(exc).__name__}: {exc}")
            lines.append(f"{name:44} FAILED {type(exc).__name__}: {exc}")
            lines.append("".join(traceback.format_exception(exc)[-3:]).rstrip())
            continue
        version = getattr(module, "__version__", "")
        lines.append(f"{name:44} {version:14} {getattr(module, '__file__', '') or ''}")
    carried = kit_versions()
    kit_site = str((KIT / "site").resolve())
    for dist, mod in (
        ("transformers", "transformers"),
        ("huggingface-hub", "huggingface_hub"),
        ("timm", "timm"),
        ("salesforce-lavis", "lavis"),
    ):
        module = sys.modules.get(mod)
        path = os.path.realpath(getattr(module, "__file__", "") or "")
        if module is not None and not path.startswith(kit_site):
            problems.append(f"{mod} comes from {path}, not the kit (PYTHONPATH order?)")
        elif module is not None and getattr(module, "__version__", None) not in (
            None,
            carried[dist][1],
        ):
            problems.append(f"{mod} is {module.__version__}, kit pins {carried[dist][1]}")
    try:
        import tokenizers  # noqa: F401

        problems.append("tokenizers is importable: the shim did not hide it")
    except ImportError:
        lines.append("tokenizers                                   hidden by the shim (as meant)")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rehearsed = read_image_versions(HERE / "image_versions.txt")
    host = host_versions()
    layers = {p.name: p.layer for p in read_packages(HERE / "packages.txt")}
    rows, differ = table(rehearsed, host, kit_versions(), layers)
    imports, problems = import_checks()
    head = [
        f"python {platform.python_version()} ({sys.executable}), {platform.machine()}, "
        f"{platform.platform()}",
        f"kit {KIT}",
        f"sys.path: {' | '.join(sys.path)}",
    ]
    text = "\n".join(
        head
        + ["", "Versions: the host the kit was rehearsed with, this host, the kit, which is used"]
        + rows
        + ["", "Differences from the rehearsed host:"]
        + (differ or ["none"])
        + ["", "Imports (in this kit run):"]
        + imports
        + ["", "Problems:"]
        + (problems or ["none"])
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.txt").write_text(text + "\n", encoding="utf-8")
    (args.out / "versions-differ.txt").write_text(
        "Host versions that differ from the rehearsed host:\n"
        + "\n".join("  " + d for d in differ or ["none"])
        + "\n",
        encoding="utf-8",
    )
    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "host": host,
        "rehearsed": rehearsed,
        "differ": differ,
        "problems": problems,
    }
    (args.out / "env.json").write_text(json.dumps(env, indent=1) + "\n", encoding="utf-8")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
