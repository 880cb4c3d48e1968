"""Drive the HTTP service with N concurrent clients; compare with a reference-style server.

    python benchmarks/load.py [--model tiny|large-random] [--clients 8] [--duration 60]
    python benchmarks/load.py --model large-random --device cuda --precision fp16   # GPU host
    python benchmarks/load.py --url http://127.0.0.1:7777      # a server already running here

Both servers run as subprocesses on 127.0.0.1 with the same weights and the same images, one after
the other: ours (`REST.py`: one inference worker, dynamic batching, fast decoding; result cache off
so every request really runs the model) and `benchmarks/reference_server.py` (Flask's threaded dev
server, stock LAVIS generate per request, no lock). Clients post like the orchestrator (multipart
`file`, `image.jpg`, `image/jpeg`) in a closed loop for a bounded time. A last phase measures a
result-cache hit on our server. The last line printed is JSON.

`--device cuda` runs both servers on the GPU (DEVICE for ours, `--device` for the reference-style
one); the device each server reports in /health is printed, so a silent CPU fallback shows.
`--url` drives a server that is already running on this machine (e.g. the Docker image started
with `--gpus all -p 7777:7777 -e CACHE_SIZE=0`; keep its result cache off so every request runs
the model); only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_support import (  # noqa: E402
    batch_histogram,
    busy_neighbour,
    cpu_counters,
    describe,
    free_port,
    machine,
    model_threads,
    parse_variant,
    steal_share,
    thread_batches,
    tiny_shapes_pngs,
    variant_env,
    wait_ready,
)

TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"


@dataclass
class Run:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    steal: float | None = None  # the hypervisor's share of the machine during the run

    @property
    def steal_pct(self) -> str:
        return "-" if self.steal is None else f"{100 * self.steal:.1f}"

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


def loopback_url(url: str) -> str:
    """`url` without a trailing slash; refuse anything but this machine (load stays local)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in (
        "127.0.0.1",
        "localhost",
        "::1",
    ):
        raise SystemExit(f"--url must be http(s) on 127.0.0.1/localhost/::1, got {url!r}")
    return url.rstrip("/")


def server_device(base: str) -> tuple[str, list[str]]:
    """The device a server says it runs on in /health, and its warnings."""
    try:
        body = requests.get(base + "/health", timeout=10).json()
    except (requests.RequestException, ValueError):
        return "unknown", []
    return str(body.get("device", "unknown")), [str(w) for w in body.get("warnings", [])]


def report_device(name: str, base: str, wanted: str | None) -> str:
    device, warnings = server_device(base)
    print(
        f"{name} server reports device {device}" + (f"; warnings: {warnings}" if warnings else "")
    )
    if wanted and wanted.startswith("cuda") and not device.startswith("cuda"):
        print(f"warning: {name} server asked for {wanted} but reports {device}")
    return device


def drive_existing(args: argparse.Namespace, images: list[bytes]) -> int:
    """Load a server that is already running on this machine; no baseline, no cache phase."""
    base = loopback_url(args.url)
    device = report_device("target", base, args.device)
    drive("warm-up", base, images[:2], 2, 0.1, 600.0)
    send = post_raw if args.raw else post
    run = drive("target", base, images, args.clients, args.duration, 600.0, send)
    print(f"{'server':<10}{'ok':>6}{'req/s':>10}{'p50 s':>10}{'p95 s':>10}{'steal %':>9}  errors")
    print(
        f"{run.name:<10}{run.ok:>6}{run.throughput:>10.3f}{run.pct(0.5):>10.3f}"
        f"{run.pct(0.95):>10.3f}{run.steal_pct:>9}  {run.errors or '-'}"
    )
    summary = {
        "url": base,
        "device": device,
        "clients": args.clients,
        "rps": round(run.throughput, 4),
        "p50_s": round(run.pct(0.5), 4),
        "p95_s": round(run.pct(0.95), 4),
        "errors": sum(run.errors.values()),
        "steal": None if run.steal is None else round(run.steal, 4),
    }
    print(json.dumps(summary))
    return 0


Send = Callable[[str, bytes, float], requests.Response]


def post(base: str, data: bytes, timeout: float) -> requests.Response:
    files = {"file": ("image.jpg", data, "image/jpeg")}
    return requests.post(base + "/analyze", files=files, timeout=timeout)


def post_raw(base: str, data: bytes, timeout: float) -> requests.Response:
    """The image as the whole body (CONTRACT.md's raw body; --raw)."""
    return requests.post(
        base + "/analyze", data=data, headers={"Content-Type": "image/png"}, timeout=timeout
    )


def drive(
    name: str,
    base: str,
    images: list[bytes],
    clients: int,
    duration: float,
    timeout: float,
    send: Send = post,
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
                resp = send(base, data, timeout)
                kind = "ok" if resp.status_code == 200 else f"http {resp.status_code}"
            except requests.RequestException as exc:
                kind = type(exc).__name__
            with lock:
                if kind == "ok":
                    run.latencies.append(time.monotonic() - started)
                else:
                    run.errors[kind] = run.errors.get(kind, 0) + 1

    started, counters = time.monotonic(), cpu_counters()
    with cf.ThreadPoolExecutor(max_workers=clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    run.elapsed = time.monotonic() - started
    run.steal = steal_share(counters, cpu_counters())
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
    parser.add_argument("--device", help="DEVICE for both servers, e.g. cuda (default: auto)")
    parser.add_argument("--url", help="drive this already running loopback server instead")
    parser.add_argument(
        "--ours-env",
        action="append",
        metavar="LABEL=K=V,K=V",
        help="run ours once per variant, in this run (default: one run, 'default=')",
    )
    parser.add_argument("--neighbour", action="store_true", help="one busy process beside")
    parser.add_argument(
        "--neighbour-when",
        choices=["always", "window", "start"],
        default="always",
        help="with --neighbour: from before the first server on (always), only in each server's "
        "measured window (it arrives after start-up), or only while each server starts and "
        "warms up (it leaves before the window)",
    )
    parser.add_argument("--skip-cache", action="store_true", help="no cache-hit phase")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="post each image as a raw body, not multipart (ours only: with --url or "
        "--skip-baseline, as the reference-style server takes multipart only)",
    )
    parser.add_argument("--large-dir", type=Path, help="keep the random large_coco here (reused)")
    args = parser.parse_args(argv)
    if args.neighbour_when != "always" and not args.neighbour:
        parser.error("--neighbour-when needs --neighbour")
    if args.raw and not (args.url or args.skip_baseline):
        parser.error("--raw needs --url or --skip-baseline (the reference server takes multipart)")
    info = machine()
    print(describe(info), flush=True)
    with busy_neighbour(neighbour(args, "always")):
        return run_all(args, info)


def neighbour(args: argparse.Namespace, phase: str) -> bool:
    """Whether the busy neighbour runs in `phase` (always, window or start)."""
    return bool(args.neighbour) and args.neighbour_when == phase


def run_all(args: argparse.Namespace, info: dict[str, object]) -> int:
    """Every server of this run, one after the other, with the same images."""
    images = tiny_shapes_pngs(args.images, args.seed)
    if args.url:
        return drive_existing(args, images)
    workdir = Path(tempfile.mkdtemp(prefix="blip2-load-"))
    if args.model == "tiny":
        model_env = {"MODEL_CONFIG": str(TINY_YAML)}
        baseline_model = ["--model-config", str(TINY_YAML)]
        timeout = 60.0
    else:
        model_dir = prepare_large_random(args.large_dir or workdir, args.seed)
        model_env = {"MODEL_DIR": str(model_dir), "MODEL_DOWNLOAD": "false"}
        baseline_model = ["--model-dir", str(model_dir)]
        timeout = 600.0
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_CONFIG", "MODEL_DIR")}
    env.update(model_env)

    results: dict[str, Run] = {}
    histograms: dict[str, dict[str, int]] = {}
    threads: dict[str, int | None] = {}  # what each of our servers' model runs on
    by_threads: dict[str, dict[str, int]] = {}  # batches by their thread count, all told
    ours_port = free_port()
    send = post_raw if args.raw else post
    ours_env = {
        **variant_env(env, {}),
        "PORT": str(ours_port),
        "PRIVATE": "true",
        "AUTO_UPDATE": "false",
        "EMOJI_CACHE_DIR": str(workdir / "emoji"),
        "PRECISION": args.precision,
        "CACHE_SIZE": "0",
        "REQUEST_TIMEOUT": str(timeout),
        "LOG_LEVEL": "WARNING",
    }
    if args.device:
        ours_env["DEVICE"] = args.device
    ours_base = f"http://127.0.0.1:{ours_port}"
    ours_device = "unknown"
    for label, extra in [parse_variant(v) for v in args.ours_env or ["default="]]:
        name = "ours" if label == "default" else f"ours:{label}"
        log = workdir / f"{label}.log"
        proc = start([sys.executable, "REST.py"], {**ours_env, **extra}, log)
        try:
            with busy_neighbour(neighbour(args, "start")):
                wait_ready(ours_base, proc, log)
                threads[name] = model_threads(ours_base)  # the start-up choice
                ours_device = report_device(name, ours_base, args.device)
                drive("warm-up", ours_base, images[:2], 2, 0.1, timeout)
                warm = batch_histogram(ours_base)
            with busy_neighbour(neighbour(args, "window")):
                results[name] = drive(
                    name, ours_base, images, args.clients, args.duration, timeout, send
                )
            by_threads[name] = thread_batches(ours_base)
            after = batch_histogram(ours_base)
            histograms[name] = {
                k: n - warm.get(k, 0) for k, n in after.items() if n - warm.get(k, 0)
            }
        finally:
            stop(proc)

    hits = Run("cache-hit")
    if not args.skip_cache:  # same server settings, cache on, the same image again and again
        cache_env = {**ours_env, "CACHE_SIZE": "1024"}
        proc = start([sys.executable, "REST.py"], cache_env, workdir / "ours-cache.log")
        try:
            wait_ready(ours_base, proc, workdir / "ours-cache.log")
            post(ours_base, images[0], timeout)  # fills the cache
            hits = drive("cache-hit", ours_base, images[:1], 1, 5.0, timeout, send)
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
            *(["--device", args.device] if args.device else []),
        ]
        proc = start(cmd, env, workdir / "baseline.log")
        base = f"http://127.0.0.1:{port}"
        try:
            with busy_neighbour(neighbour(args, "start")):
                wait_ready(base, proc, workdir / "baseline.log")
                drive("warm-up", base, images[:2], 2, 0.1, timeout)
            with busy_neighbour(neighbour(args, "window")):
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
        describe({**info, **machine()})
        + (f" (a busy neighbour ran: {args.neighbour_when})" if args.neighbour else "")
    )
    print(
        f"model: {args.model}, clients: {args.clients}, duration: {args.duration:g}s per server, "
        f"precision (ours): {args.precision}, images: {args.images}, device (ours): {ours_device}"
    )
    for name, hist in histograms.items():
        print(
            f"{name} batch sizes (from /metrics): {hist}; model threads: {threads.get(name)} "
            f"at start, batches by threads (warm-up included): {by_threads.get(name) or '-'}"
        )
    print(f"{'server':<10}{'ok':>6}{'req/s':>10}{'p50 s':>10}{'p95 s':>10}{'steal %':>9}  errors")
    for run in results.values():
        print(
            f"{run.name:<10}{run.ok:>6}{run.throughput:>10.3f}{run.pct(0.5):>10.3f}"
            f"{run.pct(0.95):>10.3f}{run.steal_pct:>9}  {run.errors or '-'}"
        )
    hit_p50_ms = statistics.median(hits.latencies) * 1000 if hits.latencies else float("nan")
    print(f"cache hit: {hits.ok} requests, p50 {hit_p50_ms:.2f} ms")
    ours = next(run for name, run in results.items() if name.startswith("ours"))
    summary: dict[str, object] = {
        "model": args.model,
        "clients": args.clients,
        "precision": args.precision,
        "device": ours_device,
        "neighbour": args.neighbour_when if args.neighbour else False,
        "ours_rps": round(ours.throughput, 4),
        "ours_p50_s": round(ours.pct(0.5), 4),
        "ours_p95_s": round(ours.pct(0.95), 4),
        "ours_errors": sum(ours.errors.values()),
        "cache_hit_p50_ms": round(hit_p50_ms, 3),
    }
    for name, run in results.items():
        if name.startswith("ours:"):
            summary[f"{name}_rps"] = round(run.throughput, 4)
            summary[f"{name}_vs_first"] = round(run.throughput / ours.throughput, 3)
    summary |= {f"{name}_threads": n for name, n in threads.items()}
    summary |= {f"{name}_batches_by_threads": n for name, n in by_threads.items() if n}
    for name, run in results.items():
        if run.steal is not None:
            summary[f"{name}_steal"] = round(run.steal, 4)
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
