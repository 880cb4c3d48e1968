"""How many cores the model's own thread should use: all of them, or one.

Called once at start-up on the inference thread (torch's thread count is an OpenMP setting of the
calling thread), when TORCH_THREADS is not set.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from captioner.base import CaptionModel

log = logging.getLogger(__name__)

#: How much faster every core must caption a batch than one before the model gets them all.
#: The model's time is not the service's: under load the same cores also parse requests,
#: decode and prepare images and write answers (about half of a tiny-model cycle), and a team
#: that takes the other core from that work must win it back. Measured served (8 clients,
#: alternating servers, docs/performance.md): where every core was 1.05-1.28x faster in the
#: timing (the tiny model, Intel Xeon), one thread served 6.5 % more idle and 13 % more beside a
#: busy neighbour; at 1.19x (Zen 5) every core served 5 % more idle and 3 % less beside one;
#: ViT-L (about 1.9x) needs every core. 1.5x keeps the tiny model on one thread and ViT-L on all.
ALL_CORES_SPEEDUP = 1.5


def choose_threads(captioner: CaptionModel, batch: int = 1) -> int:
    """With TORCH_THREADS unset on a CPU: time a warm caption with every core and with one
    (interleaved, best of each), keep one unless every core is much faster (`pick`), and
    return it. A fast model is timed on a full `batch` (what it runs under load; at one image
    its ops are too small to tell), a slow one on one image. Call on the thread that runs the
    model (the setting is per OpenMP thread) after `Captioner.warmup`.

    Why: splitting an op across cores pays only when the op is big. ViT-L at 384 px is
    (2 threads: about 2x faster); the tiny model's ops are so small that the fork/join of
    every parallel region costs more than it saves (measured 1.8x more requests per second
    with one thread, docs/performance.md). Timing the real model decides for any model."""
    from PIL import Image

    torch = captioner._torch
    most = torch.get_num_threads()
    if most <= 1 or not captioner.device.startswith("cpu"):
        return most
    image = Image.new("RGB", (captioner.spec.image_size,) * 2, (127, 127, 127))
    started = time.perf_counter()
    captioner.caption([image])
    images = [image] * (max(1, batch) if time.perf_counter() - started < 0.25 else 1)
    best: dict[int, float] = {}
    for round_no in range(5):
        for threads in (most, 1):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            captioner.caption(images)
            took = time.perf_counter() - started
            best[threads] = min(best.get(threads, took), took)
        if round_no == 0 and best[most] > 0.5:
            break  # a big model: one round is clear enough, and each costs seconds
    chosen = pick(best, most)
    torch.set_num_threads(chosen)
    log.info(
        "torch threads: %d (%d warm captions took %.1f ms with %d threads, %.1f ms with 1)",
        chosen,
        len(images),
        best[most] * 1e3,
        most,
        best[1] * 1e3,
    )
    return chosen


def pick(best: dict[int, float], most: int) -> int:
    """`most` if its best time beats one thread's by `ALL_CORES_SPEEDUP`, else 1."""
    return most if best[1] >= ALL_CORES_SPEEDUP * best[most] else 1
