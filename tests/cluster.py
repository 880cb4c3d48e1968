"""A real cluster on one machine: N service replicas (tiny model), redis-server, HAProxy with the
shipped deploy/haproxy.cfg in front. Used by the scale test and benchmarks/scale.py."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from redis_process import RedisProcess
from service_process import ROOT, ServiceProcess, free_port

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


class HAProxyProcess:
    """haproxy in the foreground with deploy/haproxy.cfg, replicas given by environment."""

    def __init__(self, replicas: list[str], *, maxconn: int = 16) -> None:
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not Path(binary).exists():
            raise RuntimeError("haproxy is not installed (.ci/run installs it with apt-get)")
        self.port, self.stats_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "PATH": "/usr/sbin:/usr/bin:/bin",
            "HAPROXY_BIND": f"127.0.0.1:{self.port}",
            "HAPROXY_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "HAPROXY_REPLICA_MAXCONN": str(maxconn),
        }
        env.update({f"BLIP2_REPLICA_{i + 1}": address for i, address in enumerate(replicas)})
        self._log = tempfile.NamedTemporaryFile(prefix="haproxy-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(HAPROXY_CFG)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_replicas_up(self, count: int, timeout: float = 60.0) -> None:
        """Until HAProxy's own checks see `count` replicas UP."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.up_count() >= count:
                return
            time.sleep(0.2)
        raise RuntimeError(f"haproxy sees {self.up_count()} of {count} replicas up")

    def up_count(self) -> int:
        try:
            csv = requests.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=2).text
        except requests.RequestException:
            return 0
        rows = [line.split(",") for line in csv.splitlines() if line.startswith("blip2,replica")]
        return sum(1 for row in rows if row[17].startswith("UP"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._log.close()


class Cluster:
    """Replicas sharing one Redis (result cache and jobs) and one spool folder."""

    def __init__(self, replicas: int = 3, env: dict[str, str] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blip2-cluster-"))
        self.redis = RedisProcess(self.dir, appendonly=True)
        self.env = {
            "REDIS_URL": self.redis.url,
            "JOBS_DIR": str(self.dir / "jobs"),
            "JOB_CLAIM_TIMEOUT": "5",
            "DRAIN_TIMEOUT": "20",
            "TORCH_THREADS": "1",  # three replicas share two cores
            **(env or {}),
        }
        self.replicas = [ServiceProcess(self.env) for _ in range(replicas)]
        for replica in self.replicas:
            replica.start(wait=0)
        for replica in self.replicas:
            replica.wait_healthy(180)
        self.haproxy = HAProxyProcess([f"127.0.0.1:{r.port}" for r in self.replicas])
        self.haproxy.wait_replicas_up(replicas)
        self.url = self.haproxy.url

    def restart(self, index: int) -> None:
        """Start replica `index` again on its port (after a kill or a drain)."""
        old = self.replicas[index]
        old.close()
        self.replicas[index] = ServiceProcess(self.env, port=old.port).start(wait=180)

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
        self.haproxy.close()
        self.redis.close()
        shutil.rmtree(self.dir, ignore_errors=True)
