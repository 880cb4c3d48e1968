"""The image's layers: size and the step that made each, and files a later layer rewrote.

Why: a layer that rewrites an earlier layer's files (a `chown -R` after an install, a second
install over the first) stores them twice; the image then costs twice its size to pull and
store. The saved image is read layer by layer, and every file path that a later layer adds again,
or removes with a whiteout, is reported.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

#: Adding the service's user rewrites the base's account files (a few KB); that is the one
#: rewrite an image with its own user cannot avoid, so it is listed apart, not as a fault.
ACCOUNT_FILES = {
    "etc/passwd",
    "etc/passwd-",
    "etc/group",
    "etc/group-",
    "etc/shadow",
    "etc/shadow-",
    "etc/gshadow",
    "etc/gshadow-",
    "etc/.pwd.lock",
    "etc/subuid",
    "etc/subuid-",
    "etc/subgid",
    "etc/subgid-",
    "var/log/lastlog",
    "var/log/faillog",
}


@dataclass
class Layer:
    size: int
    files: int
    created_by: str


@dataclass
class LayerReport:
    layers: list[Layer] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    account_files: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| layer | size | files | made by |", "|---:|---:|---:|---|"]
        for i, layer in enumerate(self.layers, 1):
            step = layer.created_by.replace("|", "\\|")
            step = step if len(step) <= 90 else step[:87] + "..."
            lines.append(f"| {i} | {layer.size / 1e6:,.1f} MB | {layer.files:,} | `{step}` |")
        total = sum(layer.size for layer in self.layers)
        lines.append(f"| all | {total / 1e6:,.1f} MB | | |")
        return "\n".join(lines)


def _history(engine: str, env: dict[str, str], image: str) -> list[str]:
    """The steps that made a layer, oldest first (steps like ENV make none)."""
    out = subprocess.run(
        [engine, "history", "--no-trunc", "--format", "{{json .}}", image],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    steps = []
    text = out.strip()
    entries = (
        json.loads(text) if text.startswith("[") else [json.loads(ln) for ln in text.splitlines()]
    )
    for entry in entries:
        size = entry.get("Size") or entry.get("size") or 0
        created = entry.get("CreatedBy") or entry.get("createdBy") or ""
        if str(size) not in ("0", "0B", "0 B") and "ENV " not in created:
            steps.append(created.split("/bin/sh -c ")[-1].strip())
    return list(reversed(steps))


def layer_report(engine: str, env: dict[str, str], image: str) -> LayerReport:
    report = LayerReport()
    steps = _history(engine, env, image)
    seen: set[str] = set()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        archive = Path(tmp) / "image.tar"
        subprocess.run(
            [engine, "save", "--format", "docker-archive", "-o", str(archive), image]
            if engine == "podman"
            else [engine, "save", "-o", str(archive), image],
            env=env,
            check=True,
            capture_output=True,
            timeout=1800,
        )
        with tarfile.open(archive) as outer:
            manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
            names = manifest[0]["Layers"]
            for index, name in enumerate(names):
                member = outer.getmember(name)
                files = 0
                added: set[str] = set()
                with tarfile.open(fileobj=outer.extractfile(member), mode="r|*") as layer:
                    for entry in layer:
                        path = entry.name.lstrip("./")
                        base = path.rsplit("/", 1)[-1]
                        if base.startswith(".wh."):
                            # a deleted file or an opaque folder: either undoes earlier files
                            target = path[: len(path) - len(base)] + base[4:]
                            target = target.removesuffix("/.wh..opq").removesuffix(".wh..opq")
                            if target in seen or any(p.startswith(target + "/") for p in seen):
                                report.rewritten.append(f"removed {target}")
                            continue
                        if entry.isdir():
                            continue
                        files += 1
                        if path in seen and path in ACCOUNT_FILES:
                            report.account_files.append(path)
                        elif path in seen:
                            report.rewritten.append(path)
                        added.add(path)
                seen |= added
                step = steps[index] if len(steps) == len(names) else "?"
                report.layers.append(Layer(member.size, files, step))
    return report
