"""The model's thread count chosen before each batch, from the load of the moment.

`cpu_threads.choose_threads` picks a count once, at start-up, for a quiet machine. The load
changes after that: neighbour services come and go. While other processes hold the CPU, whether
fewer threads serve more is a property of the CPU's kernels and the neighbour, not of anything
the process can know in advance. Measured (ViT-L, 2 cores, a busy neighbour,
docs/performance.md): on an Intel guest fp32 served 1.21x more on one thread than on two and
bf16 1.08x *less*; on Zen 4 bf16 served 1.14x more on one. So a busy machine's count is not
guessed, it is timed: one measured stretch of batches on the count the load suggests
(`threads_for`), one on the start-up count, keep the faster per image, and time them again
while the machine stays busy, no sooner than `RETRY_S` and than the slower count's lost seconds
make up `RETRY_SHARE` of the time since. A quiet machine gets the start-up count at once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cpu_threads import BUSY_CORES, others_cpu, usable_cpus

Result = TypeVar("Result")

log = logging.getLogger(__name__)

#: The shortest interval the per-batch choice measures: /proc/stat and the process's own times
#: count in 10 ms ticks, so over a few tens of milliseconds (a small model's batch) other
#: processes' share is too coarse to act on; shorter batches keep the count until it is longer.
#: It is also the least batch time each count of a trial gets.
FOLLOW_MIN_S = 0.5
#: How far below a bound other processes' use must fall before the count rises again.
RISE_MARGIN = 0.1
#: How long a busy machine keeps a trial's verdict at least before it times both counts again:
#: the neighbour may change what it does without changing how much CPU it takes.
RETRY_S = 300.0
#: A trial's cost, the seconds the slower count lost against the faster, is at most this share
#: of the time until the next (measured, ViT-L beside a neighbour on 2 cores: one batch of 8
#: 10-20 % slower, 2-9 s, so bf16 retries after 5 minutes, fp32 after about 15).
RETRY_SHARE = 0.01
#: Two counts' mean batch sizes this close (smaller over larger) are compared as they are.
SAME_SIZE = 0.8


@dataclass
class Timed:
    """Batches on one count: their seconds, images and number."""

    seconds: float = 0.0
    images: int = 0
    batches: int = 0

    def add(self, other: Timed) -> None:
        self.seconds += other.seconds
        self.images += other.images
        self.batches += other.batches

    @property
    def per_image(self) -> float:
        return self.seconds / self.images

    @property
    def mean_batch(self) -> float:
        return self.images / self.batches


@dataclass
class Trial:
    """Both counts timed under one load, in the order of `counts`. Per-image time depends on
    the batch size (a batch of 2 costs more per image than one of 8), so two counts are
    compared only on batches of about one size (`SAME_SIZE`); else the count timed first is
    timed again at the size of the moment (the service's warm-up batch, then full ones)."""

    counts: tuple[int, ...]
    timed: dict[int, Timed] = field(default_factory=dict)
    #: Counts in the order their timing completed.
    done: list[int] = field(default_factory=list)

    def add(self, timed: dict[int, Timed]) -> None:
        for count, more in timed.items():
            self.timed.setdefault(count, Timed()).add(more)
            if count not in self.done and self.timed[count].seconds >= FOLLOW_MIN_S:
                self.done.append(count)

    def next_count(self) -> int | None:
        """The count to time next, or None once each has had `FOLLOW_MIN_S` of batches of
        about one size."""
        for count in self.counts:
            if count not in self.done:
                return count
        sizes = [self.timed[count].mean_batch for count in self.counts]
        if min(sizes) >= SAME_SIZE * max(sizes):
            return None
        first = self.done.pop(0)
        del self.timed[first]
        return first

    def lost(self, winner: int) -> float:
        """Seconds the counts other than `winner` took beyond what `winner` would have."""
        best = self.timed[winner].per_image
        return sum(
            max(0.0, t.seconds - best * t.images) for c, t in self.timed.items() if c != winner
        )

    def fastest(self) -> int:
        """The count with the least seconds per image; the first one on a tie."""
        return min(self.counts, key=lambda count: self.timed[count].per_image)


@dataclass
class Verdict:
    """A trial's winner for one pair of counts, and until when it holds."""

    counts: tuple[int, ...]
    count: int
    until: float


class LoadFollower:
    """The model's thread count before each batch: `quiet` (the start-up choice) while other
    processes used less than `BUSY_CORES` since the last choice (at least `FOLLOW_MIN_S` ago,
    usually the last batch's start). While they use more, the faster of two counts, timed on
    the live batches: `threads_for` (one thread fewer for every core they hold) and `quiet`.
    A trial runs each for one measured interval (one ViT-L batch; a few hundred tiny ones),
    counts only batches whose load was the same when measured after them, and its verdict
    holds for `RETRY_S` or longer (`RETRY_SHARE`). The load's suggestion rises only once other
    processes' use is `RISE_MARGIN` below the bound that lowered it. Runs on the inference
    thread; `threads` and `batches` are read by /metrics from other threads (plain int reads;
    `batches` never gains keys)."""

    def __init__(
        self,
        quiet: int,
        set_threads: Callable[[int], None],
        measure: Callable[[], Callable[[], float | None]] = others_cpu,
        clock: Callable[[], float] = time.monotonic,
        cores: int | None = None,
    ) -> None:
        """`set_threads`: applies a count on the calling thread; `measure`: starts a measurement
        of other processes' CPU (`others_cpu`); `clock`: seconds, for intervals and batch
        times; `cores`: the CPUs this process may use."""
        self.quiet = max(1, quiet)
        self.cores = cores or len(usable_cpus() or ()) or os.cpu_count() or 1
        self.threads = self.quiet
        #: What the load alone suggests (`threads_for`, with the rise margin): `quiet` when quiet.
        self.suggested = self.quiet
        #: Batches run, by the threads they ran on.
        self.batches = dict.fromkeys(range(1, self.quiet + 1), 0)
        self._set = set_threads
        self._measure = measure
        self._clock = clock
        self._since, self._from = measure(), clock()
        #: Batches by count since the last measurement (not yet vouched for).
        self._timed: dict[int, Timed] = {}
        self._trial: Trial | None = None
        self._verdict: Verdict | None = None

    def run(
        self, run_batch: Callable[[Sequence[Any], Any], Result], items: Sequence[Any], options: Any
    ) -> Result:
        """`run_batch(items, options)` on the count chosen for it, timed for the trials."""
        threads = self.before_batch()
        started = self._clock()
        result = run_batch(items, options)
        self.after_batch(threads, len(items), self._clock() - started)
        return result

    def before_batch(self) -> int:
        """Set and return the count for the batch about to run."""
        now = self._clock()
        if self.quiet > 1 and now - self._from >= FOLLOW_MIN_S:
            span, busy = now - self._from, self._since()
            self._since, self._from = self._measure(), now
            timed, self._timed = self._timed, {}
            self._follow(busy, span, timed, now)
        self.batches[self.threads] += 1
        return self.threads

    def after_batch(self, threads: int, images: int, seconds: float) -> None:
        """Record a batch's time; a trial uses it once the next measurement shows the load
        it ran under was the one the trial is for."""
        if self._trial is None or images <= 0:
            return
        self._timed.setdefault(threads, Timed()).add(Timed(seconds, images, 1))

    def _follow(self, busy: float | None, span: float, timed: dict[int, Timed], now: float) -> None:
        suggested = threads_for(busy, self.quiet, self.cores)
        if suggested > self.suggested and busy is not None:
            suggested = max(self.suggested, threads_for(busy + RISE_MARGIN, self.quiet, self.cores))
        self.suggested = suggested
        if suggested == self.quiet:
            self._trial = None
            self._apply(self.quiet, f"other processes used {busy or 0.0:.2f} cores", span)
            return
        counts = (suggested, self.quiet)
        if self._trial is not None and self._trial.counts == counts:
            self._trial.add(timed)  # the batches since the last measurement ran under this load
        else:
            verdict = self._verdict
            if verdict is not None and verdict.counts == counts and now < verdict.until:
                self._trial = None
                self._apply(verdict.count, f"other processes used {busy:.2f} cores", span)
                return
            self._trial = Trial(counts)
        following = self._trial.next_count()
        if following is not None:
            self._apply(following, f"timing it: other processes used {busy:.2f} cores", span)
            return
        trial, self._trial = self._trial, None
        winner = trial.fastest()
        holds = max(RETRY_S, trial.lost(winner) / RETRY_SHARE)
        self._verdict = Verdict(counts, winner, now + holds)
        log.info(
            "torch threads: %d beside other processes' %.2f cores (%s per image; "
            "timed again in %.0f s while busy)",
            winner,
            busy,
            ", ".join(f"{trial.timed[c].per_image:.3f} s on {c}" for c in counts),
            holds,
        )
        self._apply(winner, "", span)

    def _apply(self, threads: int, why: str, span: float) -> None:
        if threads == self.threads:
            return
        self._set(threads)
        if why:
            log.info("torch threads: %d (%s over the last %.1f s)", threads, why, span)
        self.threads = threads


def threads_for(busy: float | None, quiet: int, cores: int) -> int:
    """Threads the load suggests while other processes use `busy` cores of `cores`: `quiet`
    below `BUSY_CORES`, else one fewer than the cores for every core they hold from a quarter of
    it on (0.25-1.24 cores: one, 1.25-2.24: two, ...), at most `quiet`, at least one. On two
    cores with every core chosen, any neighbour from a quarter core on suggests one thread."""
    if busy is None or busy < BUSY_CORES:
        return quiet
    held = math.floor(busy + 1 - BUSY_CORES)
    return max(1, min(quiet, cores - held))


def follows_load(device: str, pinned: bool) -> bool:
    """Whether the model's thread count is chosen per batch (`LoadFollower`): on a CPU, with
    TORCH_THREADS unset (`pinned` False)."""
    return device.startswith("cpu") and not pinned


def with_follower(
    run_batch: Callable[[Sequence[Any], Any], Result], follower: LoadFollower
) -> Callable[[Sequence[Any], Any], Result]:
    """`run_batch` with `follower` choosing the thread count before each call and timing it."""

    def run(items: Sequence[Any], options: Any) -> Result:
        return follower.run(run_batch, items, options)

    return run
