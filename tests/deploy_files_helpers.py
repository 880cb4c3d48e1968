"""Shared by the deploy file tests (tests/test_deploy_files.py, tests/test_deploy_haproxy.py):
where the files are, the numbers they must agree on, and readers for the manifests, compose.yaml,
haproxy.cfg and .env.example. The names keep their leading underscore from when they were private
to one test module."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
HAPROXY_CFG = DEPLOY / "haproxy.cfg"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes minor the manifests promise to work on, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SERVICE_PORT = 7777
HEALTH_PATH = "/health"
# Documented defaults used when a file leaves the variable unset.
DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_REQUEST_TIMEOUT = 60.0
# Settings the service is gaining (issues 8, 9, 10) that .env.example does not list yet.
PENDING_IN_ENV_EXAMPLE = frozenset(
    {
        "DRAIN_TIMEOUT",
        "JOBS_DB",
        "JOBS_DIR",
        "JOB_CLAIM_TIMEOUT",
        "REDIS_URL",
        "MAX_BATCH_ITEMS",
        "MAX_JOB_ITEMS",
    }
)
HAPROXY_REPLICA_SLOTS = 8
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|h|m|s|d)")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}$")


# --- loading ---------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def _all_manifests() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in _docs(path)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _all_manifests()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kubernetes, got {found}"
    return found[0]


def _compose() -> dict[str, Any]:
    with COMPOSE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _compose_value(raw: object) -> str:
    """A Compose value with `${NAME:-default}` resolved to its default (the shipped value)."""
    text = str(raw)
    match = _INTERPOLATION.match(text)
    if match is None:
        assert "${" not in text, f"unsupported interpolation in compose.yaml: {text!r}"
        return text
    assert match.group(2) is not None, f"{text!r} has no default in compose.yaml"
    return match.group(2)


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "compose.yaml: write environment as a mapping"
    return {key: _compose_value(value) for key, value in env.items()}


def _replica_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from the repo's Dockerfile that run the service (no command override)."""
    replicas = {}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if not build or "command" in svc:
            continue
        context = (DEPLOY / build["context"]).resolve()
        if context == ROOT and build.get("dockerfile", "Dockerfile") == "Dockerfile":
            replicas[name] = svc
    return replicas


def _seconds(text: str, unitless: str = "s") -> float:
    """'45s', '1m30s', '75s', '2000' (HAProxy: milliseconds without a unit) → seconds."""
    text = text.strip().strip('"')
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text) * _UNIT_SECONDS[unitless]
    parts = _DURATION.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _known_env_names() -> set[str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))
    assert "PORT" in names and "MODEL_DIR" in names, "could not parse .env.example"
    return names | PENDING_IN_ENV_EXAMPLE


def _haproxy_cfg() -> str:
    return HAPROXY_CFG.read_text(encoding="utf-8")


def _haproxy_timeout(name: str) -> float:
    match = re.search(rf"^\s*timeout {name}\s+(\S+)", _haproxy_cfg(), flags=re.MULTILINE)
    assert match, f"haproxy.cfg sets no 'timeout {name}'"
    return _seconds(match.group(1), unitless="ms")


def _haproxy_binary() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("the haproxy binary is not installed (Debian package haproxy)")
    return found


def _haproxy_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without any inherited HAProxy/replica settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLIP2_REPLICA", "HAPROXY_"))}
    return {**env, **extra}


def _deployment_container() -> dict[str, Any]:
    containers = _one("Deployment", "blip2")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _configmap_env() -> dict[str, str]:
    return {k: str(v) for k, v in _one("ConfigMap", "blip2-config")["data"].items()}


def _deployment_env() -> dict[str, str]:
    """The replicas' environment: the ConfigMaps they load, then their own `env` entries."""
    container = _deployment_container()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update({k: str(v) for k, v in _one("ConfigMap", name)["data"].items()})
    env.update({e["name"]: str(e.get("value", "")) for e in container.get("env", [])})
    return env
