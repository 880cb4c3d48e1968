"""Which packages a Python process of a GPU-kit run imported, and from where (kit or host).

The shim calls `write` at exit in every process (pytest, servers, benchmarks), so the versions
table covers what really ran, not what was installed. A record is one JSON file per process:
{"argv": [...], "modules": {top-level name: {"file", "where", "dists": {name: version}}}}.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def where(path: str, kit: str) -> str:
    """kit-site, kit-fallback, kit-stubs, kit-src, kit-shim, or host."""
    real = os.path.realpath(path)
    for part in ("site", "fallback", "stubs", "src", "shim"):
        root = os.path.realpath(os.path.join(kit, part)) + os.sep
        if real.startswith(root):
            return f"kit-{part}"
    return "host"


def owners(path: str, candidates: list[str]) -> dict[str, str]:
    """The distributions (name -> version) whose installed copy holds `path`: the first
    dist-info on sys.path may belong to another copy (a host package the kit shadows)."""
    import importlib.metadata as md

    real = os.path.realpath(path)
    out = {}
    for name in candidates:
        try:
            dist = md.distribution(name)
            base = os.path.realpath(str(dist.locate_file("")))
        except Exception:
            continue
        if real.startswith(base + os.sep):
            out[name] = dist.version
    return out


def modules(kit: str) -> dict[str, dict[str, Any]]:
    """Imported top-level modules outside the standard library, with their distributions."""
    import importlib.metadata as md

    try:
        by_module = md.packages_distributions()
    except Exception:
        by_module = {}
    stdlib = set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)
    out: dict[str, dict[str, Any]] = {}
    for name, module in list(sys.modules.items()):
        if "." in name or name in stdlib or name.startswith("_") or module is None:
            continue
        path = getattr(module, "__file__", None)
        if not path:
            continue
        place = where(path, kit)
        dists = (
            {}
            if place in ("kit-stubs", "kit-src", "kit-shim")
            else owners(path, by_module.get(name, []))
        )
        out[name] = {"file": path, "where": place, "dists": dists}
    return out


def write(directory: str, kit: str) -> str:
    os.makedirs(directory, exist_ok=True)
    record = {"argv": sys.argv, "pid": os.getpid(), "modules": modules(kit)}
    path = os.path.join(directory, f"imports-{os.getpid()}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
    return path
