"""What the benchmarks share: the machine they ran on (printed first by each, since numbers are
only compared with numbers measured in the same run, on the same machine) and the tiny-shapes
images they send."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import random
from pathlib import Path
from typing import Any


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
