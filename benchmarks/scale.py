"""Throughput of 1, 2 and 3 replicas behind a real HAProxy (tiny model, real redis-server).

    python benchmarks/scale.py [--seconds 20] [--clients 8] [--replicas 1 2 3]

Each replica is a `python REST.py` process with TORCH_THREADS=1 (they share the cores); 8 clients
in a closed loop post distinct tiny-shapes images (drawn beforehand; no cache hits) through
HAProxy. Besides
requests/s and latency it reports where the time goes: the CPU seconds each replica and HAProxy
used per request, and the model's share of it from each replica's /metrics. On a 2-core machine
more replicas cannot add throughput; this shows it, and by how much the extra processes cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "scripts"), str(Path(__file__).parent)]

from bench_support import describe, machine  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_scale import post, shapes_png  # noqa: E402

from cluster import Cluster  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def model_seconds(base: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "blip2_model_batch_duration_seconds_sum":
                return sample.value
    return 0.0


def run(replicas: int, clients: int, seconds: float) -> dict[str, float]:
    cluster = Cluster(replicas=replicas)
    try:
        for i in range(clients):  # warm every replica's caches and allocator
            post(cluster.url, shapes_png(900_000 + i))
        pids = [r.proc.pid for r in cluster.replicas if r.proc] + [cluster.haproxy.proc.pid]
        cpu_before = [cpu_seconds(p) for p in pids]
        model_before = sum(model_seconds(r.url) for r in cluster.replicas)
        latencies: list[float] = []
        errors = [0]
        images = [shapes_png(n) for n in range(4000)]  # drawn before the clock starts
        client_cpu = time.process_time()
        stop = time.monotonic() + seconds
        lock = threading.Lock()

        def client(n: int) -> None:
            k = 0
            while time.monotonic() < stop:
                k += 1
                started = time.perf_counter()
                image = images[(n * 500 + k) % len(images)]
                ok = post(cluster.url, image).status_code == 200
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors[0] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        client_cpu = time.process_time() - client_cpu
        cpu = [cpu_seconds(p) - b for p, b in zip(pids, cpu_before, strict=True)]
        model = sum(model_seconds(r.url) for r in cluster.replicas) - model_before
        done = len(latencies)
        return {
            "replicas": replicas,
            "requests_per_s": round(done / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p95_ms": round(statistics.quantiles(latencies, n=20)[18] * 1000, 1),
            "errors": errors[0],
            "replica_cpu_ms_per_req": round(sum(cpu[:-1]) / done * 1000, 1),
            "model_ms_per_req": round(model / done * 1000, 1),
            "haproxy_cpu_ms_per_req": round(cpu[-1] / done * 1000, 2),
            "client_cpu_ms_per_req": round(client_cpu / done * 1000, 1),
            "cpu_busy_share": round(((sum(cpu) + client_cpu) / wall) / (os.cpu_count() or 1), 2),
        }
    finally:
        cluster.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    print(describe(machine()))
    rows = [run(n, args.clients, args.seconds) for n in args.replicas]
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
