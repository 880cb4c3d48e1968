"""What the benchmarks share: the machine they ran on (printed first by each, since numbers are
only compared with numbers measured in the same run, on the same machine) and the tiny-shapes
images they send."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server to bind."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    base: str, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 900
) -> None:
    """Until the server at `base` answers /health with 200 (it may load a large model first);
    an error with its log's end where it exits, or after `timeout` seconds."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.is_file() else ""
            raise RuntimeError(f"server exited with {proc.returncode}; its log ends:\n{tail}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def machine() -> dict[str, Any]:
    """CPU model, cores, flags that matter for the model (AVX-512, AMX), load, Python."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "amx": "amx_tile" in flags,
        "load_1min": round(load[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def cpu_counters() -> list[int] | None:
    """The machine's CPU time counters (the first line of /proc/stat), None where unreadable."""
    try:
        return [
            int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """Share of the machine's CPU time that the hypervisor gave to other guests between two
    `cpu_counters` readings (steal time, the 8th counter); None where unknown. On the shared
    virtual machines of docs/performance.md a 20 s window with 12 % steal served 59 req/s where
    windows without steal served 79, in the same server: read a window's number with it."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    spent = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(spent[:8])
    return spent[7] / total if total > 0 else None


def describe(info: dict[str, Any]) -> str:
    features = ", ".join(f for f in ("avx512", "amx") if info.get(f)) or "no AVX-512/AMX"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores ({features}), load {info['load_1min']}, "
        f"python {info['python']}"
    )


def tiny_shapes_pngs(n: int, seed: int) -> list[bytes]:
    """`n` tiny-shapes scenes as PNG bytes (scripts/ must be on sys.path)."""
    import tiny_shapes

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img, _ = tiny_shapes.sample(rng)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


#: Variables that change how torch's OpenMP threads behave; stripped for a "default" run so a
#: value left in the shell cannot leak into what is reported as the default environment.
THREAD_ENV = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "GOMP_SPINCOUNT",
    "MKL_NUM_THREADS",
    "TORCH_THREADS",
    "OMP_PROC_BIND",
    "OMP_DYNAMIC",
)


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``label=K=V,K=V`` (``passive=OMP_WAIT_POLICY=PASSIVE``; ``default=`` for none)."""
    label, _, rest = spec.partition("=")
    env = dict(item.split("=", 1) for item in rest.split(",") if item)
    return label or "default", env


def variant_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """`base` without the thread variables, plus the variant's own."""
    return {**{k: v for k, v in base.items() if k not in THREAD_ENV}, **extra}


@contextlib.contextmanager
def busy_neighbour(enabled: bool) -> Iterator[None]:
    """A process beside the service that keeps one core busy (a pure-Python loop), like
    another service on the same machine; nothing when not `enabled`."""
    if not enabled:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


def metrics_lines(base: str, timeout: float = 10.0) -> list[str]:
    """The lines of the service's /metrics (Prometheus text)."""
    import requests

    return requests.get(base + "/metrics", timeout=timeout).text.splitlines()


def model_threads(base: str, timeout: float = 10.0) -> int | None:
    """Threads the service's model runs on now (TORCH_THREADS, or its start-up choice as the
    per-batch choice left it), from its /metrics; None where it does not say."""
    for line in metrics_lines(base, timeout):
        if line.startswith("blip2_model_threads "):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def thread_batches(base: str, timeout: float = 10.0) -> dict[str, int]:
    """Batches the service ran by the threads they ran on (where it chooses per batch), from
    its /metrics; empty where it does not say (TORCH_THREADS set)."""
    found: dict[str, int] = {}
    for line in metrics_lines(base, timeout):
        if line.startswith('blip2_model_thread_batches_total{threads="'):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = int(float(value))
    return found


def batch_histogram(base: str, timeout: float = 10.0) -> dict[str, int]:
    """Batches run by batch-size bucket (`le`), from the service's /metrics (cumulative counts
    turned into per-bucket counts)."""
    cumulative: list[tuple[float, int]] = []
    for line in metrics_lines(base, timeout):
        if line.startswith("blip2_model_batch_size_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            cumulative.append((float(le), int(float(line.rsplit(" ", 1)[1]))))
    out: dict[str, int] = {}
    previous = 0
    for le, count in sorted(cumulative):
        if count - previous:
            out[f"<={le:g}"] = count - previous
        previous = count
    return out
