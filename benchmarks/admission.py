"""Shedding at the door: how fast do requests that cannot be queued get their 503?

    python benchmarks/admission.py [--clients 64] [--max-queue 4] [--rounds 5] [--side 1024]
                                   [--processes 1] [--control]

Starts `python REST.py` around the tiny-shapes model on 127.0.0.1 (result cache off) with
MAX_QUEUE=`--max-queue`, then, `--rounds` times, releases `--clients` clients at once (a
barrier), each posting one `--side`-pixel JPEG like the orchestrator (`requests`, a new
connection each). Meanwhile one prober calls /health every 50 ms. Prints the machine, the 503
latency (p50/p95; target p95 < 100 ms), that every 503 carries Retry-After, the 200s' latency
and the /health latency. Last line: JSON.

The clients are Python threads: with `--processes P` they are spread over P processes (so
they do not all wait for one GIL, as independent callers would not). `--control` first runs
the same bursts against a bare server in its own process that answers every request with a
canned 503 on its headers and does nothing else: the clients' own floor on this machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_support import describe, free_port, machine, variant_env, wait_ready  # noqa: E402

TINY_YAML = ROOT / "models" / "tiny-shapes" / "model.yaml"
TARGET_P95_S = 0.1


def photo_like_jpeg(side: int, seed: int) -> bytes:
    """A noisy gradient JPEG: costs a real decode, unlike a flat image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[:, None, None]) / 2
    pixels = np.clip(base + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))]


Answer = tuple[int, float, bool]  # status, seconds, has Retry-After


def _burst_part(base: str, images: list[bytes], gate: Any) -> list[Answer]:
    def one(data: bytes) -> Answer:
        gate.wait(timeout=60)
        started = time.monotonic()
        files = {"file": ("image.jpg", data, "image/jpeg")}
        resp = requests.post(base + "/analyze", files=files, timeout=120)
        return resp.status_code, time.monotonic() - started, "Retry-After" in resp.headers

    with cf.ThreadPoolExecutor(max_workers=len(images)) as pool:
        return list(pool.map(one, images))


def _part_in_process(base: str, images: list[bytes], gate: Any, out: Any) -> None:
    out.put(_burst_part(base, images, gate))


def burst(base: str, images: list[bytes], processes: int = 1) -> list[Answer]:
    """Every client posts once, all released together (across `processes` processes)."""
    if processes <= 1:
        return _burst_part(base, images, threading.Barrier(len(images)))
    ctx = mp.get_context("fork")
    gate, out = ctx.Barrier(len(images)), ctx.Queue()
    parts = [images[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_part_in_process, args=(base, p, gate, out)) for p in parts]
    for proc in procs:
        proc.start()
    answers = [a for _ in procs for a in out.get(timeout=300)]
    for proc in procs:
        proc.join(timeout=30)
    return answers


CANNED_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
)


def bare_server(port: int) -> None:
    """One thread, one selector: a 503 on each request's headers, then half-close and discard
    the rest (what the service's door does), nothing else. The clients' floor."""
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    heads: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is listener:
                conn, _ = listener.accept()
                conn.setblocking(True)
                heads[conn] = b""
                sel.register(conn, selectors.EVENT_READ)
                continue
            data = sock.recv(256 * 1024)  # type: ignore[union-attr]
            if not data:
                sel.unregister(sock)
                heads.pop(sock, None)  # type: ignore[call-overload]
                sock.close()  # type: ignore[union-attr]
            elif sock in heads:
                heads[sock] += data  # type: ignore[index]
                if b"\r\n\r\n" in heads[sock]:  # type: ignore[index]
                    del heads[sock]  # type: ignore[arg-type]
                    sock.sendall(CANNED_503)  # type: ignore[union-attr]
                    sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]


def control(images: list[bytes], rounds: int, processes: int) -> list[Answer]:
    """The same bursts against `bare_server` in its own process."""
    port = free_port()
    server = mp.get_context("fork").Process(target=bare_server, args=(port,), daemon=True)
    server.start()
    time.sleep(0.5)
    try:
        base = f"http://127.0.0.1:{port}"
        return [a for _ in range(rounds) for a in burst(base, images, processes)]
    finally:
        server.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--side", type=int, default=1024, help="pixels per side of each JPEG")
    parser.add_argument("--processes", type=int, default=1, help="client processes")
    parser.add_argument("--control", action="store_true", help="measure the clients' floor")
    args = parser.parse_args(argv)
    print(describe(machine()), flush=True)
    images = [photo_like_jpeg(args.side, i) for i in range(args.clients)]
    floor_p95 = None
    if args.control:
        floor = [s for code, s, _ in control(images, args.rounds, args.processes) if code == 503]
        floor_p95 = round(pct(floor, 0.95) * 1000, 1)
        print(f"control (bare 503 server, same clients): {len(floor)} x 503, p50 "
              f"{pct(floor, 0.5) * 1000:.1f} ms, p95 {floor_p95} ms", flush=True)  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="admission-") as tmp:
        env = {
            **variant_env(dict(os.environ), {}),
            "MODEL_CONFIG": str(TINY_YAML),
            "PORT": str(port),
            "PRIVATE": "true",
            "AUTO_UPDATE": "false",
            "CACHE_SIZE": "0",
            "MAX_QUEUE": str(args.max_queue),
            "EMOJI_CACHE_DIR": str(Path(tmp) / "emoji"),
            "JOBS_DIR": str(Path(tmp) / "jobs"),
            "LOG_LEVEL": "WARNING",
        }
        log = Path(tmp) / "service.log"
        proc = subprocess.Popen(
            [sys.executable, "REST.py"],
            cwd=ROOT,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        health: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set():
                started = time.monotonic()
                requests.get(base + "/health", timeout=2).raise_for_status()
                health.append(time.monotonic() - started)
                stop.wait(0.05)

        try:
            wait_ready(base, proc, log)
            burst(base, images[:2])  # warm-up
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            answers = [a for _ in range(args.rounds) for a in burst(base, images, args.processes)]
            stop.set()
            prober.join(timeout=5)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    refused = [s for code, s, _ in answers if code == 503]
    served = [s for code, s, _ in answers if code == 200]
    other = sorted({code for code, _, _ in answers} - {200, 503})
    all_retry = all(retry for code, _, retry in answers if code == 503)
    p95 = pct(refused, 0.95)
    print(f"{args.rounds} rounds x {args.clients} clients in {args.processes} process(es), "
          f"MAX_QUEUE={args.max_queue}, "
          f"{args.side}px JPEG ({len(images[0]) // 1024} KiB)")  # fmt: skip
    print(f"503: {len(refused)}, p50 {pct(refused, 0.5) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms "
          f"(target < {TARGET_P95_S * 1000:.0f} ms), Retry-After on all: {all_retry}")  # fmt: skip
    print(f"200: {len(served)}, p50 {pct(served, 0.5):.3f} s, p95 {pct(served, 0.95):.3f} s; "
          f"other statuses: {other or '-'}")  # fmt: skip
    print(f"/health during the bursts: {len(health)} probes, p95 {pct(health, 0.95) * 1000:.1f} ms")
    print(
        json.dumps(
            {
                "refused": len(refused),
                "refused_p50_ms": round(pct(refused, 0.5) * 1000, 1),
                "refused_p95_ms": round(p95 * 1000, 1),
                "processes": args.processes,
                "control_refused_p95_ms": floor_p95,
                "retry_after_on_all": all_retry,
                "served": len(served),
                "served_p95_s": round(pct(served, 0.95), 3),
                "other_statuses": other,
                "health_p95_ms": round(pct(health, 0.95) * 1000, 1),
                "health_max_ms": round(max(health, default=float("nan")) * 1000, 1),
            }
        )
    )
    return 0 if p95 < TARGET_P95_S and all_retry and not other else 1


if __name__ == "__main__":
    sys.exit(main())
