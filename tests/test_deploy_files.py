"""The deploy files in deploy/ stay valid and agree with the service, checked offline.

No Docker engine or cluster runs here, so each file is checked by a tool that knows its format:
kubernetes-validate (strict, pinned Kubernetes versions) for the manifests, check-jsonschema's
bundled Compose Specification schema for compose.yaml, and the real haproxy binary for
haproxy.cfg, which also routes real requests around dead and unready local replicas. The
cross-checks tie together the numbers that must agree across files (grace periods and
DRAIN_TIMEOUT, probes and the port, timeouts and REQUEST_TIMEOUT, environment names and
.env.example), so editing one file alone fails here instead of in production.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import requests
import yaml

from local_http import LocalHTTPServer

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# --- validation by the tools that know each format -------------------------------------------


def test_every_required_kubernetes_kind_is_shipped() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in _all_manifests()}
    for required in [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("v1", "ConfigMap"),
        ("v1", "PersistentVolumeClaim"),
    ]:
        assert required in kinds, f"deploy/kubernetes has no {required}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        # Raises on any schema error, unknown field (strict) or unknown kind/apiVersion.
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field() -> None:
    deployment = _one("Deployment", "blip2")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema with the Compose Specification schema it bundles (no network)."""
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pytest.fail(
            "check-jsonschema is missing: it ships the Compose Specification schema that "
            "validates deploy/compose.yaml offline (add check-jsonschema to the dev group)"
        )
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [*cmd, str(path)], capture_output=True, text=True, timeout=120, check=False
    )


def test_compose_file_matches_the_compose_specification() -> None:
    result = _check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_validation_rejects_an_unknown_key(tmp_path: Path) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    broken = tmp_path / "compose.yaml"
    broken.write_text(text.replace("  init: true\n", "  init: true\n  stop_grace: 45s\n", 1))
    result = _check_compose(broken)
    assert result.returncode != 0 and "stop_grace" in result.stdout, result.stdout


def test_haproxy_config_is_valid_without_warnings() -> None:
    env = {f"BLIP2_REPLICA_{i}": f"127.0.0.1:{17780 + i}" for i in (1, 2, 3)}
    result = subprocess.run(
        [_haproxy_binary(), "-c", "-dW", "-f", str(HAPROXY_CFG)],
        env=_haproxy_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_config_accepts_the_compose_environment() -> None:
    """Replica names do not resolve here; HAProxy must start anyway and find them later."""
    env = _compose_env(_compose()["services"]["haproxy"])
    result = subprocess.run(
        [_haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)],
        env=_haproxy_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_config_refuses_to_start_without_replicas() -> None:
    result = subprocess.run(
        [_haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)],
        env=_haproxy_env({}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert "BLIP2_REPLICA_1 is not set" in result.stdout + result.stderr


# --- HAProxy with the shipped config, in front of real local replicas ------------------------


@dataclass
class Balancer:
    """A running haproxy with deploy/haproxy.cfg and the replicas it was given."""

    url: str
    stats_url: str
    replicas: dict[str, str]


def _answer_with_body_digest(req: BaseHTTPRequestHandler) -> None:
    """A healthy replica: reads the whole body and says how much it got."""
    length = int(req.headers.get("Content-Length") or 0)
    body = req.rfile.read(length)
    data = f'{{"bytes": {len(body)}, "sha256": "{hashlib.sha256(body).hexdigest()}"}}'.encode()
    req.send_response(200)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


def _hang_up(req: BaseHTTPRequestHandler) -> None:
    """A replica killed mid-request: reads the request, then closes without any answer."""
    req.rfile.read(int(req.headers.get("Content-Length") or 0))
    req.close_connection = True


def _wait_for(url: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s")


@pytest.fixture
def replicas() -> Iterator[dict[str, LocalHTTPServer | int]]:
    """Two healthy replicas, one draining (503), one that hangs up, one dead port."""
    good_a, good_b, draining, hanging = (LocalHTTPServer() for _ in range(4))
    for server in (good_a, good_b):
        server.set(HEALTH_PATH, '{"status":"healthy"}')
        server.handle("/analyze", _answer_with_body_digest)
    draining.set(HEALTH_PATH, '{"status":"draining"}', status=503)
    draining.set("/analyze", '{"status":"error"}', status=503)
    hanging.set(HEALTH_PATH, '{"status":"healthy"}')
    hanging.handle("/analyze", _hang_up)
    yield {
        "good_a": good_a,
        "good_b": good_b,
        "draining": draining,
        "hanging": hanging,
        "dead": _free_port(),
    }
    for server in (good_a, good_b, draining, hanging):
        server.close()


@pytest.fixture
def balancer(replicas: dict[str, LocalHTTPServer | int], tmp_path: Path) -> Iterator[Balancer]:
    port, stats = _free_port(), _free_port()
    env = {"HAPROXY_BIND": f"127.0.0.1:{port}", "HAPROXY_STATS_BIND": f"127.0.0.1:{stats}"}
    names: dict[str, str] = {}
    for slot, (role, replica) in enumerate(replicas.items(), start=1):
        replica_port = replica if isinstance(replica, int) else replica.port
        env[f"BLIP2_REPLICA_{slot}"] = f"127.0.0.1:{replica_port}"
        names[role] = f"replica{slot}"
    log = (tmp_path / "haproxy.log").open("w")
    proc = subprocess.Popen(
        [_haproxy_binary(), "-db", "-f", str(HAPROXY_CFG)],
        env=_haproxy_env(env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(f"http://127.0.0.1:{stats}/healthz")
        yield Balancer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats}", names)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _server_states(stats_url: str) -> dict[str, str]:
    text = requests.get(f"{stats_url}/stats;csv", timeout=5).text
    states = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == "blip2" and fields[1].startswith("replica"):
            states[fields[1]] = fields[17]
    return states


def test_haproxy_routes_every_request_around_dead_draining_and_hung_up_replicas(
    balancer: Balancer, replicas: dict[str, LocalHTTPServer | int]
) -> None:
    body = os.urandom(200_000)  # a typical JPEG upload; must be re-sent whole on a retry
    digest = hashlib.sha256(body).hexdigest()
    failures = []
    for i in range(40):
        if i % 2:
            resp = requests.post(
                f"{balancer.url}/analyze",
                data=body,
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
            expected = {"bytes": len(body), "sha256": digest}
        else:
            resp = requests.get(f"{balancer.url}/analyze?url=http://x/y.jpg", timeout=30)
            expected = {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        if resp.status_code != 200 or resp.json() != expected:
            failures.append((i, resp.status_code, resp.text[:200]))
    assert failures == []

    hanging, good_a = replicas["hanging"], replicas["good_a"]
    assert isinstance(hanging, LocalHTTPServer) and isinstance(good_a, LocalHTTPServer)
    # The retries were really exercised: the hung-up replica was sent requests and lost them.
    assert any(s.path.startswith("/analyze") for s in hanging.seen)
    forwarded = [s for s in good_a.seen if s.path.startswith("/analyze")]
    assert forwarded and all("x-request-id" in map(str.lower, s.headers) for s in forwarded)

    # Health checks on /health take the 503 and dead replicas out; the others stay in.
    names = balancer.replicas
    deadline = time.monotonic() + 15
    states = _server_states(balancer.stats_url)
    while time.monotonic() < deadline and not (
        states.get(names["draining"], "").startswith("DOWN")
        and states.get(names["dead"], "").startswith("DOWN")
    ):
        time.sleep(0.25)
        states = _server_states(balancer.stats_url)
    assert states[names["draining"]].startswith("DOWN"), states
    assert states[names["dead"]].startswith("DOWN"), states
    for role in ("good_a", "good_b", "hanging"):
        assert states[names[role]].startswith("UP"), states


# --- cross-checks between the files and the service ------------------------------------------


def test_compose_grace_period_exceeds_drain_timeout() -> None:
    replicas = _replica_services(_compose())
    assert replicas, "compose.yaml has no replica built from the repo's Dockerfile"
    for name, svc in replicas.items():
        drain = float(_compose_env(svc).get("DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
        grace = _seconds(svc.get("stop_grace_period", "10s"))
        assert grace > drain, f"{name}: stop_grace_period {grace}s <= DRAIN_TIMEOUT {drain}s"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", f"{name}: drain starts on SIGTERM"


def test_kubernetes_grace_period_exceeds_prestop_plus_drain_timeout() -> None:
    pod = _one("Deployment", "blip2")["spec"]["template"]["spec"]
    drain = float(_deployment_env().get("DRAIN_TIMEOUT", DEFAULT_DRAIN_TIMEOUT))
    pre_stop = 0.0
    hook = _deployment_container().get("lifecycle", {}).get("preStop")
    if hook:
        command = hook["exec"]["command"]
        assert command[0] == "sleep", f"unexpected preStop hook {command}"
        pre_stop = float(command[1])
    grace = float(pod["terminationGracePeriodSeconds"])
    assert grace > pre_stop + drain, f"grace {grace}s <= preStop {pre_stop}s + drain {drain}s"


def test_kubernetes_probes_ask_health_on_the_service_port() -> None:
    container = _deployment_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert _deployment_env()["PORT"] == str(SERVICE_PORT)
    grace = float(
        _one("Deployment", "blip2")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        port = ports.get(probe["port"], probe["port"])
        assert (probe["path"], port) == (HEALTH_PATH, SERVICE_PORT), kind
    startup = container["startupProbe"]
    # Loading the real model takes minutes: give it ten at least before a restart.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    liveness = container["livenessProbe"]
    # A drain answers 503 until the pod is gone; liveness must not restart it first.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > grace
    assert (
        container["readinessProbe"].get("failureThreshold", 3)
        * container["readinessProbe"].get("periodSeconds", 10)
        <= 10
    ), "readiness should drop a draining replica within 10 s"


def test_kubernetes_objects_point_at_each_other() -> None:
    deployment = _one("Deployment", "blip2")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _deployment_container()
    service = _one("Service", "blip2")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {
        p["name"] for p in container["ports"]
    } | {SERVICE_PORT}
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "blip2")
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    claims = {
        d["metadata"]["name"] for d in _all_manifests() if d["kind"] == "PersistentVolumeClaim"
    }
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = _deployment_env()
    models = volumes[mounts[env["MODEL_DIR"]]]
    assert models["persistentVolumeClaim"]["claimName"] in claims
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
    redis_host = urlparse(env["REDIS_URL"]).hostname
    services = {d["metadata"]["name"] for d in _all_manifests() if d["kind"] == "Service"}
    assert redis_host in services, f"REDIS_URL host {redis_host} is no Service in the manifests"


def test_compose_replicas_have_a_gpu_the_models_volume_and_redis() -> None:
    compose = _compose()
    for name, svc in _replica_services(compose).items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        ), f"{name} reserves no NVIDIA GPU"
        env = _compose_env(svc)
        model_dir = env.get("MODEL_DIR", "/models")
        assert any(str(v).split(":")[1] == model_dir for v in svc["volumes"]), name
        redis_host = urlparse(env["REDIS_URL"]).hostname
        assert redis_host in compose["services"], f"{name}: REDIS_URL host is no service"


def test_haproxy_sends_to_every_compose_replica_on_the_service_port() -> None:
    compose = _compose()
    replicas = _replica_services(compose)
    haproxy_env = _compose_env(compose["services"]["haproxy"])
    addresses = {k: v for k, v in haproxy_env.items() if re.fullmatch(r"BLIP2_REPLICA_\d+", k)}
    targets = {}
    for key, address in addresses.items():
        slot = int(key.rsplit("_", 1)[1])
        assert 1 <= slot <= HAPROXY_REPLICA_SLOTS, f"haproxy.cfg has no slot for {key}"
        host, port = address.rsplit(":", 1)
        targets[host] = int(port)
    assert set(targets) == set(replicas), "every replica behind HAProxy, and nothing else"
    for name, svc in replicas.items():
        env = _compose_env(svc)
        assert targets[name] == int(env.get("PORT", SERVICE_PORT)) == SERVICE_PORT
        # HAProxy sends a replica no more requests at once than it has threads to serve.
        assert haproxy_env["HAPROXY_REPLICA_MAXCONN"] == env["THREADS"], name


def test_haproxy_checks_health_and_retries_elsewhere() -> None:
    cfg = _haproxy_cfg()
    assert re.search(rf"^\s*option httpchk GET {HEALTH_PATH}\s*$", cfg, flags=re.MULTILINE)
    assert re.search(r"^\s*http-check expect status 200\s*$", cfg, flags=re.MULTILINE)
    retry_on = re.search(r"^\s*retry-on (.+)$", cfg, flags=re.MULTILINE)
    assert retry_on and {"conn-failure", "empty-response", "response-timeout"} <= set(
        retry_on.group(1).split()
    )
    assert re.search(r"^\s*option redispatch\b", cfg, flags=re.MULTILINE)
    assert re.search(r"^\s*retries [1-9]", cfg, flags=re.MULTILINE)
    slots = set(re.findall(r'server replica(\d+) "\$\{BLIP2_REPLICA_(\d+)\}"', cfg))
    assert slots == {(str(i), str(i)) for i in range(1, HAPROXY_REPLICA_SLOTS + 1)}


def test_haproxy_waits_longer_than_the_service_request_timeout() -> None:
    request_timeouts = [float(_deployment_env().get("REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT))]
    for svc in _replica_services(_compose()).values():
        env = _compose_env(svc)
        request_timeouts.append(float(env.get("REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT)))
    for name in ("server", "client"):
        assert _haproxy_timeout(name) > max(request_timeouts), f"timeout {name}"


def test_compose_haproxy_environment_is_read_by_haproxy_cfg() -> None:
    cfg = _haproxy_cfg()
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", cfg)) | set(
        re.findall(r"defined\(([A-Z0-9_]+)\)", cfg)
    )
    env = _compose_env(_compose()["services"]["haproxy"])
    assert set(env) <= referenced, f"haproxy.cfg ignores {set(env) - referenced}"


def test_every_environment_variable_set_is_one_the_service_knows() -> None:
    known = _known_env_names()
    set_by_files: dict[str, set[str]] = {}
    compose = _compose()
    for name, svc in compose["services"].items():
        if svc.get("build"):  # the service image: replicas and the model download
            set_by_files[f"compose.yaml:{name}"] = set(_compose_env(svc))
    for doc in _all_manifests():
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            set_by_files[where] = set(doc["data"])
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            if container["image"].startswith("blip2"):
                set_by_files[where] = {e["name"] for e in container.get("env", [])}
    assert set_by_files
    unknown = {where: names - known for where, names in set_by_files.items() if names - known}
    assert unknown == {}, f"variables the service does not read (see .env.example): {unknown}"
