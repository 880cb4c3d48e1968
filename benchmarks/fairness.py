"""Interactive latency while a big job runs: do jobs stay out of interactive callers' way?

    python benchmarks/fairness.py [--job-images 2000] [--requests 150] [--omp-passive]

Starts `python REST.py` around the tiny-shapes model on 127.0.0.1 (result cache off, so every
request runs the model; jobs in a temporary JOBS_DIR), then:

1. idle: one client posts images to /v3/analyze one after another (like the orchestrator);
2. busy: a job of `--job-images` images is submitted to /v3/jobs, and once it is running the
   same client posts the same number of requests while the job goes on.

Prints the machine, interactive p50/p95 for both phases, their ratio (the target: busy p50 at
most 2x idle p50) and the job's throughput during the busy phase. The last line is JSON.
`--omp-passive` starts the service with OMP_WAIT_POLICY=PASSIVE (see docs/performance.md).
`--variant LABEL=K=V,...` (repeatable) measures the service once per environment in this run
(e.g. `--variant default= --variant active=OMP_WAIT_POLICY=ACTIVE`); `--neighbour` keeps one
core busy with another process for the whole run, like a second service on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_support import (  # noqa: E402
    busy_neighbour,
    describe,
    free_port,
    machine,
    model_threads,
    parse_variant,
    tiny_shapes_pngs,
    variant_env,
)

TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 60
TARGET_RATIO = 2.0


def start_service(workdir: Path, extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **variant_env(dict(os.environ), extra),
        "MODEL_CONFIG": str(TINY_YAML),
        "AUTO_UPDATE": "false",
        "PRIVATE": "true",
        "CACHE_SIZE": "0",
        "JOBS_DIR": str(workdir / "jobs"),
        "EMOJI_CACHE_DIR": str(workdir / "emoji"),
        "MAX_JOB_BYTES": str(1 << 30),
    }
    log = (workdir / "service.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "REST.py", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"service exited with {proc.returncode}; see {workdir}/service.log")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("service not ready in time")


def interactive(base: str, images: list[bytes], count: int, until: Any = None) -> list[float]:
    """`count` sequential analyze requests (fewer if `until()` turns true); their latencies."""
    session = requests.Session()
    latencies = []
    for i in range(count):
        if until is not None and until():
            break
        data = images[i % len(images)]
        started = time.monotonic()
        resp = session.post(
            base + "/v3/analyze",
            files={"file": ("image.jpg", data, "image/jpeg")},
            timeout=REQUEST_TIMEOUT_S,
        )
        latencies.append(time.monotonic() - started)
        if resp.status_code != 200:
            raise SystemExit(f"analyze answered {resp.status_code}: {resp.text[:200]}")
    return latencies


def job_view(base: str, job_id: str) -> dict[str, Any]:
    resp = requests.get(f"{base}/v3/jobs/{job_id}", params={"limit": 0}, timeout=10)
    resp.raise_for_status()
    return resp.json()["job"]


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job-images", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=150, help="interactive, per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--omp-passive", action="store_true")
    parser.add_argument("--variant", action="append", metavar="LABEL=K=V,K=V")
    parser.add_argument("--neighbour", action="store_true", help="one busy process beside")
    args = parser.parse_args(argv)
    print(describe(machine()) + (" (a busy neighbour ran)" if args.neighbour else ""), flush=True)
    specs = args.variant or (
        ["passive=OMP_WAIT_POLICY=PASSIVE"] if args.omp_passive else ["default="]
    )
    results = []
    with busy_neighbour(args.neighbour):
        for label, extra in [parse_variant(v) for v in specs]:
            results.append(measure(args, label, extra))
    if len(results) > 1:
        first = results[0]
        for other in results[1:]:
            jobs = other["job_images_per_s_while_busy"] / max(
                first["job_images_per_s_while_busy"], 1e-9
            )
            print(
                f"{other['variant']} vs {first['variant']}: job images/s {jobs:.3f}x, "
                f"busy p50 {other['busy_p50_ms'] / first['busy_p50_ms']:.3f}x, "
                f"idle p50 {other['idle_p50_ms'] / first['idle_p50_ms']:.3f}x"
            )  # fmt: skip
    return 0 if all(r["ratio_p50"] <= TARGET_RATIO for r in results) else 1


def measure(args: argparse.Namespace, label: str, extra: dict[str, str]) -> dict[str, Any]:
    """One service in the `extra` environment: idle phase, then the job and the busy phase."""
    job_images = tiny_shapes_pngs(args.job_images, args.seed)
    probes = tiny_shapes_pngs(32, args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        proc, base = start_service(Path(tmp), extra)
        try:
            interactive(base, probes, 10)  # warm-up
            threads = model_threads(base)
            idle = interactive(base, probes, args.requests)
            files = [("file", (f"{i:05d}.png", d, "image/png")) for i, d in enumerate(job_images)]
            resp = requests.post(base + "/v3/jobs", files=files, timeout=300)
            if resp.status_code != 202:
                raise SystemExit(f"job refused: {resp.status_code} {resp.text[:200]}")
            job_id = resp.json()["job_id"]
            while job_view(base, job_id)["counts"]["done"] < 16:
                time.sleep(0.05)
            first = job_view(base, job_id)
            started = time.monotonic()
            busy = interactive(
                base,
                probes,
                args.requests,
                until=lambda: job_view(base, job_id)["state"] != "running",
            )
            elapsed = time.monotonic() - started
            end = job_view(base, job_id)
            last = end
            while last["state"] == "running":
                time.sleep(0.5)
                last = job_view(base, job_id)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    done_during = job_view_done(first, end, elapsed)
    info = machine()
    idle_p50, busy_p50 = statistics.median(idle), statistics.median(busy)
    ratio = busy_p50 / idle_p50
    print(
        f"variant {label}: {extra or 'the default environment'}; model threads: {threads}; "
        f"{describe(info)}"
    )
    print(f"job: {args.job_images} images; interactive: 1 client, {args.requests} requests/phase")
    print(f"{'phase':<8}{'requests':>10}{'p50 ms':>10}{'p95 ms':>10}")
    for name, values in (("idle", idle), ("busy", busy)):
        print(f"{name:<8}{len(values):>10}{pct(values, 0.5) * 1000:>10.1f}"
              f"{pct(values, 0.95) * 1000:>10.1f}")  # fmt: skip
    print(
        f"busy/idle p50: {ratio:.2f} (target <= {TARGET_RATIO:g}): "
        f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}; job images/s while busy: "
        f"{done_during:.1f}; job final state: {last['state']}"
    )
    result = {
        "variant": label,
        "env": extra,
        "model_threads": threads,
        "neighbour": args.neighbour,
        "idle_p50_ms": round(idle_p50 * 1000, 1),
        "idle_p95_ms": round(pct(idle, 0.95) * 1000, 1),
        "busy_p50_ms": round(busy_p50 * 1000, 1),
        "busy_p95_ms": round(pct(busy, 0.95) * 1000, 1),
        "busy_requests": len(busy),
        "ratio_p50": round(ratio, 2),
        "job_images": args.job_images,
        "job_images_per_s_while_busy": round(done_during, 1),
        "job_state": last["state"],
        **info,
    }
    print(json.dumps(result), flush=True)
    return result


def job_view_done(first: dict[str, Any], last: dict[str, Any], elapsed: float) -> float:
    """Job items finished per second between the two views (the busy phase)."""
    return (last["counts"]["done"] - first["counts"]["done"]) / max(elapsed, 1e-9)


if __name__ == "__main__":
    sys.exit(main())
