"""The project's own set-up steps: uv without touching the system Python, system packages.

Why: `make run` and `make test` are promised to do all the set-up on a bare machine
(`make test-fresh` proves it end to end on a debootstrapped Debian 12); these tests pin the two
behaviours a user meets first, with the real scripts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV_SH = ROOT / "scripts/setup/uv.sh"
DEPS_SH = ROOT / "scripts/setup/system_deps.sh"


def _bare_path(tmp_path: Path, *tools: str) -> str:
    """A PATH holding only the named tools (as links), so nothing else is found on it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_missing_packages_stop_with_one_message(tmp_path: Path) -> None:
    """No apt-get allowed: exit 1, naming every package and the command, before any test."""
    env = {
        "PATH": _bare_path(tmp_path, "bash", "id", "ls", "cat"),
        "SYSTEM_ROOT": str(tmp_path / "empty-root"),
        "SYSTEM_DEPS_INSTALL": "false",
    }
    run = subprocess.run(
        ["bash", str(DEPS_SH), "test"], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1, run
    message = run.stderr
    for package in ("redis-server", "haproxy", "chromium", "fonts-noto-color-emoji"):
        assert package in message
    assert "missing system packages" in message and "install" in message
    assert run.stdout == ""


def test_present_packages_pass_quietly() -> None:
    """On this machine `make test` has installed them: the check passes and says nothing."""
    run = subprocess.run(["bash", str(DEPS_SH), "test"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "" and run.stderr == "", run


def test_uv_on_path_is_used_as_it_is(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "uv"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho fake-uv "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    printed = subprocess.run(["bash", str(UV_SH)], env=env, capture_output=True, text=True)
    assert printed.stdout.strip() == str(fake)
    ran = subprocess.run(
        ["bash", str(UV_SH), "sync", "--frozen"], env=env, capture_output=True, text=True
    )
    assert ran.stdout.strip() == "fake-uv sync --frozen"
    assert not (tmp_path / "home").exists(), "nothing bootstrapped when uv is on PATH"


def test_uv_bootstrap_into_a_private_venv(tmp_path: Path) -> None:
    """No uv on PATH: a private copy in the user's cache, from PyPI; the system Python untouched."""
    python = shutil.which("python3")
    assert python
    before = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True).stdout
    env = {
        "PATH": f"{Path(python).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        **{k: v for k, v in os.environ.items() if k.startswith(("SSL_", "PIP_", "REQUESTS_"))},
    }
    env = {k: v for k, v in env.items() if k != "PIP_FIND_LINKS"}
    run = subprocess.run(
        ["bash", str(UV_SH), "--version"], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("uv 0.13.9"), run.stdout
    private = tmp_path / "home/.cache/blip2-caption-service/uv-0.13.9/bin/uv"
    assert private.is_file()
    again = subprocess.run(["bash", str(UV_SH)], env=env, capture_output=True, text=True)
    assert again.stdout.strip() == str(private) and "bootstrapping" not in again.stderr
    after = subprocess.run([python, "-m", "pip", "list"], capture_output=True, text=True).stdout
    assert before == after, "the system Python's packages changed"
