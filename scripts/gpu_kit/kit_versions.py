#!/usr/bin/env python3
"""The versions of every package a GPU-kit run imported, merged from each process's record.

Why: numbers from a GPU host are only comparable with the stack that produced them, and in a
kit run that stack is a mix (our pins from the kit, torch and NumPy from the host). The shim
records, per process, each top-level module with its file and distribution; this merges them into
one table: distribution, version, where it came from (kit layer, stub, host), which processes.

    kit_versions.py IMPORTS_DIR --out DIR    writes DIR/versions.txt and DIR/versions.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def process_label(argv: list[str]) -> str:
    """A short name for a process: the script or module it ran."""
    if not argv:
        return "?"
    first = os.path.basename(argv[0])
    if first in ("-c", ""):
        return "python -c"
    if first == "__main__.py" or first.endswith("pytest"):
        return "pytest"
    return first


def merge(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (distribution or module, version, where)."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for rec in records:
        label = process_label(rec.get("argv", []))
        for module, info in rec.get("modules", {}).items():
            dists = info.get("dists") or {}
            where = info.get("where", "host")
            if not dists:
                kind = "project" if where == "kit-src" else "stub" if where == "kit-stubs" else ""
                dists = {module: kind or "(no distribution)"}
            for dist, version in dists.items():
                key = (dist, version, where)
                row = rows.setdefault(
                    key,
                    {
                        "package": dist,
                        "version": version,
                        "where": where,
                        "modules": set(),
                        "processes": set(),
                        "file": info.get("file", ""),
                    },
                )
                row["modules"].add(module)
                row["processes"].add(label)
    out = []
    for row in sorted(rows.values(), key=lambda r: (r["where"] == "kit-src", r["package"].lower())):
        out.append(
            {**row, "modules": sorted(row["modules"]), "processes": sorted(row["processes"])}
        )
    return out


def render(rows: list[dict[str, Any]], n_records: int) -> str:
    head = ("package", "version", "from", "modules", "processes")
    table = [head] + [
        (
            r["package"],
            r["version"],
            r["where"],
            ",".join(r["modules"])[:40],
            ",".join(r["processes"])[:60],
        )
        for r in rows
        if r["where"] != "kit-src"
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    project = sorted({m for r in rows if r["where"] == "kit-src" for m in r["modules"]})
    versions: dict[str, set[str]] = {}
    for r in rows:
        versions.setdefault(r["package"], set()).add(r["version"])
    clash = sorted(name for name, seen in versions.items() if len(seen) > 1)
    return "\n".join(
        [
            f"Packages imported by {n_records} Python processes of this kit run",
            *lines,
            "",
            f"project modules (kit src): {', '.join(project) or '-'}",
            f"packages seen in more than one version: {', '.join(clash) or 'none'}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("imports", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = []
    for path in sorted(args.imports.glob("imports-*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"skipping {path.name}: {exc}", file=sys.stderr)
    if not records:
        print(f"no import records in {args.imports}", file=sys.stderr)
        return 1
    rows = merge(records)
    text = render(rows, len(records))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "versions.txt").write_text(text + "\n", encoding="utf-8")
    (args.out / "versions.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
