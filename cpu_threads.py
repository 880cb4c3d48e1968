"""How many cores the model's own thread should use: all of them, or one.

Two choices, both on the inference thread (torch's thread count is an OpenMP setting of the
calling thread), both only where TORCH_THREADS is not set:

- at start-up, `choose_threads` times the model with every core and with one: the count it
  runs on while the machine is quiet. The timing says how much the model gains from more cores
  only on a quiet machine (beside a busy neighbour every core is barely faster than one, whatever
  the model), so where other processes used the CPU while it timed, a small model takes one.
  A model whose one image takes `BIG_MODEL_S` or more is not timed: it gets every core (one
  image undersells what a batch of ViT-L gains, and each round costs seconds);
- before each batch, `load_follower.LoadFollower` keeps that count while the CPU is quiet and,
  while other processes hold `BUSY_CORES` or more, times fewer threads against it on the live
  batches and keeps the faster (no count chosen once is right both ways when a neighbour comes
  or goes after start-up).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
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
#: Cores' worth of CPU other processes may use while the choice is timed before the timing is
#: not trusted (a busy neighbour is a whole core).
BUSY_CORES = 0.25
#: One image this slow (on every core) is a model whose ops are big enough to split: ViT-L
#: at 384 px takes about 3 s, the tiny model a few milliseconds.
BIG_MODEL_S = 0.25


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
    others = others_cpu()
    started = time.perf_counter()
    captioner.caption([image])
    one_image = time.perf_counter() - started
    if one_image >= BIG_MODEL_S:
        log.info(
            "torch threads: %d (one warm caption took %.1f s: a model this big gets every core)",
            most,
            one_image,
        )
        return most
    images = [image] * max(1, batch)
    best: dict[int, float] = {}
    for _ in range(5):
        for threads in (most, 1):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            captioner.caption(images)
            took = time.perf_counter() - started
            best[threads] = min(best.get(threads, took), took)
    busy = others()
    chosen = decide(best, most, busy, one_image)
    torch.set_num_threads(chosen)
    log.info(
        "torch threads: %d (%d warm captions took %.1f ms with %d threads, %.1f ms with 1%s)",
        chosen,
        len(images),
        best[most] * 1e3,
        most,
        best[1] * 1e3,
        ""
        if busy is None or busy < BUSY_CORES
        else f"; other processes used {busy:.2f} cores meanwhile, so chosen by the model's size",
    )
    return chosen


def decide(best: dict[int, float], most: int, busy: float | None, one_image: float) -> int:
    """Every core for a big model (one image `BIG_MODEL_S` or more), untimed: its ops split
    well, and one image's timing undersells what a batch gains (ViT-L on Zen 4: 1.37x at one
    image, while batches of 8 served 1.8x more on two threads; one slow round put it on one
    thread for good). A small model: `pick` on a quiet machine, one thread where other
    processes used `BUSY_CORES` or more while it was timed (`busy`: cores, None where unknown)."""
    if one_image >= BIG_MODEL_S:
        return most
    if busy is not None and busy >= BUSY_CORES:
        return 1
    return pick(best, most)


def usable_cpus() -> frozenset[int] | None:
    """The CPUs this process may run on (a container's cpuset, taskset); None where unknown."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_seconds(cpus: frozenset[int] | None) -> float | None:
    """CPU seconds every process has used on `cpus` (all CPUs where None) since boot, from
    /proc/stat; None where it cannot be read."""
    # The "cpu" line sums every CPU; the "cpuN" lines are one each.
    wanted = {"cpu"} if cpus is None else {f"cpu{n}" for n in cpus}
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *values = line.split()
                if name not in wanted:
                    continue
                fields = [int(v) for v in values[:8]]
                total += sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    except (OSError, ValueError, IndexError):
        return None
    return total / ticks


def others_cpu(cpus: frozenset[int] | None = None) -> Callable[[], float | None]:
    """Start measuring: the returned function gives the cores' worth of CPU that other
    processes (and other guests' steal) used since on `cpus` (default: this process's own,
    so a container's cpuset counts and the rest of its host does not), from /proc/stat less
    this process's own time; None where /proc/stat cannot be read."""
    cpus = cpus if cpus is not None else usable_cpus()

    def sample() -> tuple[float, float, float] | None:
        busy = busy_seconds(cpus)
        if busy is None:
            return None
        mine = os.times()
        return busy, mine.user + mine.system, time.monotonic()

    first = sample()

    def since() -> float | None:
        last = sample()
        if first is None or last is None or last[2] <= first[2]:
            return None
        others = (last[0] - first[0]) - (last[1] - first[1])
        return max(0.0, others) / (last[2] - first[2])

    return since


def pick(best: dict[int, float], most: int) -> int:
    """`most` if its best time beats one thread's by `ALL_CORES_SPEEDUP`, else 1."""
    return most if best[1] >= ALL_CORES_SPEEDUP * best[most] else 1
