"""Drive the HTTP service with N concurrent clients; compare with a reference-style server.

    python benchmarks/load.py [--model tiny|large-random] [--clients 8] [--duration 60]

Both servers run as subprocesses on 127.0.0.1 with the same weights and the same images, one after
the other: ours (`REST.py`: one inference worker, dynamic batching, fast decoding; result cache off
so every request really runs the model) and `benchmarks/reference_server.py` (Flask's threaded dev
server, stock LAVIS generate per request, no lock). Clients post like the orchestrator (multipart
`file`, `image.jpg`, `image/jpeg`) in a closed loop for a bounded time. A last phase measures a
result-cache hit on our server. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"
READY_TIMEOUT_S = 900


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(n: int, seed: int) -> list[bytes]:
    import tiny_shapes

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, _ = tiny_shapes.sample(rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def prepare_large_random(workdir: Path, seed: int) -> Path:
    """large_coco with seeded random weights and a placeholder vocab of bert's size."""
    import torch

    import blip2_model

    model_dir = workdir / "large-random"
    blip2_model.write_placeholder_tokenizer(model_dir / blip2_model.TOKENIZER_DIRNAME)
    spec = blip2_model.lavis_spec("blip_caption", "large_coco", model_dir)
    if not spec.checkpoint.is_file():  # type: ignore[union-attr]
        torch.manual_seed(seed)
        model = blip2_model.build_model(spec)
        torch.save({"model": model.state_dict()}, spec.checkpoint)  # type: ignore[arg-type]
        del model
    return model_dir


def wait_ready(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def post(base: str, data: bytes, timeout: float) -> requests.Response:
    files = {"file": ("image.jpg", data, "image/jpeg")}
    return requests.post(base + "/analyze", files=files, timeout=timeout)


def drive(
    name: str, base: str, images: list[bytes], clients: int, duration: float, timeout: float
) -> Run:
    """Closed loop: each client posts, waits, posts again, until `duration` has passed."""
    run = Run(name)
    lock = threading.Lock()
    stop_at = time.monotonic() + duration
    counter = iter(range(10**9))

    def client() -> None:
        while time.monotonic() < stop_at:
            with lock:
                data = images[next(counter) % len(images)]
            started = time.monotonic()
            try:
                resp = post(base, data, timeout)
                kind = "ok" if resp.status_code == 200 else f"http {resp.status_code}"
            except requests.RequestException as exc:
                kind = type(exc).__name__
            with lock:
                if kind == "ok":
                    run.latencies.append(time.monotonic() - started)
                else:
                    run.errors[kind] = run.errors.get(kind, 0) + 1

    started = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    run.elapsed = time.monotonic() - started
    return run


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "large-random"], default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per server")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="blip2-load-"))
    images = make_images(args.images, args.seed)
    if args.model == "tiny":
        model_env = {"MODEL_CONFIG": str(TINY_YAML)}
        baseline_model = ["--model-config", str(TINY_YAML)]
        timeout = 60.0
    else:
        model_dir = prepare_large_random(workdir, args.seed)
        model_env = {"MODEL_DIR": str(model_dir), "MODEL_DOWNLOAD": "false"}
        baseline_model = ["--model-dir", str(model_dir)]
        timeout = 600.0
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_CONFIG", "MODEL_DIR")}
    env.update(model_env)

    results: dict[str, Run] = {}
    ours_port = free_port()
    ours_env = {
        **env,
        "PORT": str(ours_port),
        "PRIVATE": "true",
        "AUTO_UPDATE": "false",
        "EMOJI_CACHE_DIR": str(workdir / "emoji"),
        "PRECISION": args.precision,
        "CACHE_SIZE": "0",
        "REQUEST_TIMEOUT": str(timeout),
        "LOG_LEVEL": "WARNING",
    }
    ours_base = f"http://127.0.0.1:{ours_port}"
    proc = start([sys.executable, "REST.py"], ours_env, workdir / "ours.log")
    try:
        wait_ready(ours_base, proc)
        drive("warm-up", ours_base, images[:2], 2, 0.1, timeout)
        results["ours"] = drive("ours", ours_base, images, args.clients, args.duration, timeout)
    finally:
        stop(proc)

    # Cache hits: same server settings but with the cache on, the same image again and again.
    cache_env = {**ours_env, "CACHE_SIZE": "1024"}
    proc = start([sys.executable, "REST.py"], cache_env, workdir / "ours-cache.log")
    try:
        wait_ready(ours_base, proc)
        post(ours_base, images[0], timeout)  # fills the cache
        hits = drive("cache-hit", ours_base, images[:1], 1, 5.0, timeout)
    finally:
        stop(proc)

    if not args.skip_baseline:
        port = free_port()
        cmd = [
            sys.executable,
            "benchmarks/reference_server.py",
            "--port",
            str(port),
            *baseline_model,
        ]
        proc = start(cmd, env, workdir / "baseline.log")
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, proc)
            drive("warm-up", base, images[:2], 2, 0.1, timeout)
            results["baseline"] = drive(
                "baseline", base, images, args.clients, args.duration, timeout
            )
        finally:
            stop(proc)

    import torch

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"model: {args.model}, clients: {args.clients}, duration: {args.duration:g}s per server, "
        f"precision (ours): {args.precision}, images: {args.images}"
    )
    print(f"{'server':<10}{'ok':>6}{'req/s':>10}{'p50 s':>10}{'p95 s':>10}  errors")
    for run in results.values():
        print(
            f"{run.name:<10}{run.ok:>6}{run.throughput:>10.3f}{run.pct(0.5):>10.3f}"
            f"{run.pct(0.95):>10.3f}  {run.errors or '-'}"
        )
    hit_p50_ms = statistics.median(hits.latencies) * 1000 if hits.latencies else float("nan")
    print(f"cache hit: {hits.ok} requests, p50 {hit_p50_ms:.2f} ms")
    ours = results["ours"]
    summary = {
        "model": args.model,
        "clients": args.clients,
        "precision": args.precision,
        "ours_rps": round(ours.throughput, 4),
        "ours_p50_s": round(ours.pct(0.5), 4),
        "ours_p95_s": round(ours.pct(0.95), 4),
        "ours_errors": sum(ours.errors.values()),
        "cache_hit_p50_ms": round(hit_p50_ms, 3),
    }
    if "baseline" in results:
        baseline = results["baseline"]
        summary.update(
            baseline_rps=round(baseline.throughput, 4),
            baseline_p50_s=round(baseline.pct(0.5), 4),
            baseline_p95_s=round(baseline.pct(0.95), 4),
            baseline_errors=sum(baseline.errors.values()),
            throughput_ratio=round(ours.throughput / baseline.throughput, 2)
            if baseline.throughput
            else None,
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
