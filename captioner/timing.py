"""Best-of-N timings of a few ways to do the same work, for the start-up choices made per machine.

cpu_attention (fused kernel or matrix products), packed_linear (plain or packed weights) and
cpu_bf16 (bf16 against fp32) each time their candidates on the thread that will run the model
the same way: one warm-up call each (lazy kernel initialisation), then `rounds` rounds that
call every candidate once, interleaved so that drift hits them alike, keeping each one's best.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


def best_times(runs: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Seconds of each candidate's fastest call, under `torch.inference_mode`."""
    import torch

    best = {kind: float("inf") for kind in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # warm-up: lazy kernel initialisation
        for _ in range(rounds):
            for kind, run in runs.items():
                started = time.perf_counter()
                run()
                best[kind] = min(best[kind], time.perf_counter() - started)
    return best
