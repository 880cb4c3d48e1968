"""The install story stays consistent: lock ↔ requirements export, Makefile ↔ Dockerfile ↔ CI."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text(encoding="utf-8"))
    return {
        p["name"]: p["version"]
        for p in lock["package"]
        # The project itself (virtual or editable) is installed from the tree, not pinned.
        if not {"virtual", "editable"} & set(p.get("source", {})) and "version" in p
    }


def _exported() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.installed.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_requirements_export_matches_lock() -> None:
    locked = {k.lower(): v for k, v in _locked().items()}
    exported = _exported()
    assert exported, "requirements.installed.txt pins nothing"
    drift = {
        name: (locked.get(name), exported.get(name))
        for name in set(locked) | set(exported)
        if locked.get(name) != exported.get(name)
    }
    assert not drift, (
        f"requirements.installed.txt drifted from uv.lock (run make requirements): {drift}"
    )


def test_pinned_runtime_stack() -> None:
    locked = _locked()
    assert locked["salesforce-lavis"] == "1.0.2"
    assert locked["torch"] == "2.13.0" and locked["torchvision"] == "0.28.0"
    assert locked["transformers"].startswith("4.25.") and locked["tokenizers"] == "0.13.3"


def test_dockerfile_installs_like_the_makefile() -> None:
    docker = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    bootstrap = (ROOT / "scripts/setup/uv.sh").read_text(encoding="utf-8")
    uv_pin = re.search(r'UV_VERSION="\$\{UV_VERSION:-([\d.]+)\}"', bootstrap)
    assert uv_pin, "scripts/setup/uv.sh must pin the uv it installs"
    assert f"uv=={uv_pin.group(1)}" in docker, "the image must bootstrap the same uv"
    assert "$(UV) sync --frozen" in make and "uv sync --frozen --no-dev" in docker
    assert docker.splitlines()[0].startswith("#") and "ARG BASE_IMAGE=python:3.11-slim" in docker
    for needle in (
        'CMD ["python", "REST.py"]',
        "EXPOSE 7777",
        "HEALTHCHECK",
        "MODEL_DIR=/models",
        'VOLUME ["/models"]',
        "--chown=10001:10001",
    ):
        assert needle in docker, needle
    # The service stage never rewrites the environment it copied (a `chown -R` would double it).
    service_stage = docker.rsplit("FROM ", 1)[1]
    assert "chown -R" not in service_stage and "uv sync" not in service_stage
    user = re.findall(r"^USER (\S+)", docker, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    assert "curl" not in docker.split("HEALTHCHECK", 1)[1].split("\n\n", 1)[0].replace(
        "No curl", ""
    )


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in ci
    # CI adds no set-up a user would lack: the README's command installs what tests need.
    commands = [ln for ln in ci.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert [c for c in commands if c.startswith("make")] == ["make test", "make test-image"]
    assert "apt-get" not in ci
    first_block = readme.split("```", 2)[1]
    assert "make run" in first_block and "make test" in first_block
