"""The deploy files in deploy/ stay valid and agree with the service, checked offline.

No Docker engine or cluster runs here, so each file is checked by a tool that knows its format:
kubernetes-validate (strict, pinned Kubernetes versions) for the manifests, check-jsonschema's
bundled Compose Specification schema for compose.yaml, and the real haproxy binary (`haproxy -c`)
for haproxy.cfg. The cross-checks tie together the numbers that must agree across files (grace
periods and DRAIN_TIMEOUT, probes and the port, timeouts and REQUEST_TIMEOUT, environment names
and .env.example), so editing one file alone fails here instead of in production. HAProxy routing
real requests around dead and unready local replicas is in test_deploy_haproxy.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from deploy_files_helpers import (
    COMPOSE,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    HAPROXY_CFG,
    HAPROXY_REPLICA_SLOTS,
    HEALTH_PATH,
    KUBERNETES_VERSIONS,
    MANIFESTS,
    SERVICE_PORT,
    _all_manifests,
    _compose,
    _compose_env,
    _deployment_container,
    _deployment_env,
    _docs,
    _haproxy_binary,
    _haproxy_cfg,
    _haproxy_env,
    _haproxy_timeout,
    _known_env_names,
    _one,
    _replica_services,
    _seconds,
)

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
