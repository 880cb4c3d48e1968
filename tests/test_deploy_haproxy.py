"""deploy/haproxy.cfg at work: the real haproxy binary with the shipped config routes real
requests around dead, draining and hung-up local replicas.

Four local HTTP servers stand in for replicas (two healthy, one draining with 503, one that hangs
up mid-request) plus a port where nothing listens; haproxy is started exactly as docs/deploy.md
shows, and the test checks every answer, that retries re-send whole bodies, and the health states
haproxy's stats page reports. Skipped without the haproxy binary.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import requests

from deploy_files_helpers import HAPROXY_CFG, HEALTH_PATH, _haproxy_binary, _haproxy_env
from local_http import LocalHTTPServer

# --- HAProxy with the shipped config, in front of real local replicas ------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
