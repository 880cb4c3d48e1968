"""The model's thread count chosen before each batch (`load_follower.LoadFollower`, #16): the
start-up choice while the CPU is quiet; while other processes hold it, fewer threads timed against
it on the live batches. Checked on measured numbers, with a real busy process beside this one, and
through a real waitress server's /metrics around the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from test_metrics import post_png, scrape, threads_of_a_new_thread

from load_follower import LoadFollower
from rest_helpers import assert_success, two_red_circles


@contextmanager
def busy_neighbour() -> Iterator[None]:
    """Another process keeping one core busy, as a neighbour service would."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # running before anything is measured
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)


#: One-second intervals a test waits for the machine to be quiet again after its neighbour left
#: (other processes' use below the bound by RISE_MARGIN; a CI host's own noise is far less).
QUIET_TRIES = 10


def fed(values: list[float | None]) -> Callable[[], Callable[[], float | None]]:
    """A `measure` that reports `values` in turn: other processes' cores over each interval."""
    given = iter(values)
    return lambda: lambda: next(given)


class Model:
    """A model on a manual clock: a batch on `n` threads takes `cost[n]` seconds per image.
    `follower.run` reads the clock around it, so the trials time it as they time a real one."""

    def __init__(self, cost: dict[int, float], per_batch: float = 0.0) -> None:
        """`per_batch`: seconds each batch costs whatever its size (a small batch pays more
        per image)."""
        self.cost = cost
        self.per_batch = per_batch
        self.now = 0.0
        self.starts: list[float] = []

    def clock(self) -> float:
        return self.now

    def follower(self, quiet: int, seen: list[float | None], cores: int = 2) -> LoadFollower:
        self.applied: list[int] = []
        self.threads = quiet

        def apply(threads: int) -> None:
            self.applied.append(threads)
            self.threads = threads

        return LoadFollower(quiet, apply, measure=fed(seen), clock=self.clock, cores=cores)

    def run(self, follower: LoadFollower, batches: int, images: int = 8) -> list[int]:
        """`batches` batches of `images` through `follower`; the count each ran on."""

        def batch(items: list[int], options: object) -> int:
            assert follower.threads == self.threads  # what it reports is what torch runs on
            self.starts.append(self.now)
            self.now += self.per_batch + self.cost[self.threads] * len(items)
            return self.threads

        return [follower.run(batch, [0] * images, None) for _ in range(batches)]


def test_a_quiet_machine_keeps_the_start_up_choice() -> None:
    from load_follower import BUSY_CORES

    model = Model({1: 1.0, 2: 0.6})
    follower = model.follower(2, [0.0, 0.1, None, BUSY_CORES - 0.01])
    assert model.run(follower, 5) == [2, 2, 2, 2, 2]  # None: /proc/stat unreadable
    assert model.applied == []
    assert follower.batches == {1: 0, 2: 5}


@pytest.mark.parametrize(
    ("cost", "kept"),
    [
        ({1: 1.00, 2: 1.21}, 1),  # fp32 beside a neighbour, Intel: one thread 1.21x more
        ({1: 1.00, 2: 1.14}, 1),  # bf16 beside a neighbour, Zen 4: one thread 1.14x more
        ({1: 1.08, 2: 1.00}, 2),  # bf16 beside a neighbour, Intel: two threads 1.08x more
    ],
)
def test_a_busy_machine_times_both_counts_and_keeps_the_faster(
    cost: dict[int, float], kept: int
) -> None:
    """The measured cases (docs/performance.md): the same neighbour favours one thread or two
    by CPU and precision, so both are timed on the live batches, the suggestion first."""
    model = Model(cost)
    follower = model.follower(2, [1.0] * 9)
    # The first batch is not measured yet; then one batch on each count, then the winner.
    assert model.run(follower, 8) == [2, 1, 2] + [kept] * 5
    assert follower.threads == kept and follower.suggested == 1


def test_a_trial_compares_batches_of_about_one_size() -> None:
    """The service's warm-up batch of 2 ran on one thread, the first full batch of 8 on two: a
    batch of 2 costs more per image, so one thread is timed again on a full batch before the
    verdict (the naive comparison would keep two threads, the slower)."""
    model = Model({1: 1.0, 2: 1.14}, per_batch=3.0)
    follower = model.follower(2, [1.0] * 5)
    model.now = 1.0  # the model loaded and warmed up: the first batch is measured
    assert model.run(follower, 1, images=2) == [1]
    assert model.run(follower, 4) == [2, 1, 1, 1]
    assert (5.0 / 2) > (3.0 + 8 * 1.14) / 8 > (3.0 + 8 * 1.0) / 8  # what a naive look got wrong


def test_a_trial_counts_only_batches_whose_load_was_measured_the_same() -> None:
    """The neighbour leaves during the one-thread batch of a trial: the trial is dropped, the
    quiet count comes back, and the next busy spell times both counts afresh."""
    model = Model({1: 1.0, 2: 1.2})
    follower = model.follower(2, [1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert model.run(follower, 7) == [2, 1, 2, 1, 2, 1, 1]
    assert model.applied == [1, 2, 1, 2, 1]


def test_a_verdict_holds_while_fresh_and_is_timed_again_after_retry_s() -> None:
    """A neighbour that returns within RETRY_S gets the verdict at once; after RETRY_S both
    counts are timed again, so a neighbour that changed what it does changes the count."""
    from load_follower import RETRY_S

    model = Model({1: 1.0, 2: 1.2})
    per_batch = 8 * 1.2  # at most: batches of 8 on the slower count
    busy_batches = int(RETRY_S / per_batch) + 3
    seen: list[float | None] = [1.0, 1.0, 1.0, 0.0, 1.0] + [1.0] * busy_batches
    follower = model.follower(2, seen)
    assert model.run(follower, 6) == [2, 1, 2, 1, 2, 1]  # trial, verdict, quiet, verdict again
    decided = model.starts[3]  # the verdict was taken before the fourth batch
    model.cost = {1: 1.3, 2: 1.0}  # the neighbour changed: two threads win now
    ran = model.run(follower, busy_batches)
    retry = ran.index(2)  # the trial's second count (its first is the one running)
    assert set(ran[:retry]) == {1} and ran[retry:] == [2] * (busy_batches - retry)
    assert model.starts[6 + retry - 1] - decided >= RETRY_S > model.starts[6 + retry - 2] - decided


def test_a_costly_trial_is_repeated_less_often() -> None:
    """A trial whose slower count lost 16 s holds until those seconds are RETRY_SHARE of the
    time since (1600 s), not only RETRY_S."""
    from load_follower import RETRY_S, RETRY_SHARE

    model = Model({1: 1.0, 2: 3.0})
    lost = 8 * 3.0 - 8 * 1.0
    holds = lost / RETRY_SHARE
    assert holds > RETRY_S
    follower = model.follower(2, [1.0] * 400)
    assert model.run(follower, 4) == [2, 1, 2, 1]
    decided = model.starts[3]
    ran = model.run(follower, int(holds / 8) + 4)
    retry = ran.index(2)
    assert model.starts[4 + retry - 1] - decided >= holds > model.starts[4 + retry - 2] - decided


def test_on_many_cores_a_neighbour_takes_only_the_cores_it_holds() -> None:
    """Eight cores: HAProxy's third of a core or one busy neighbour costs one thread, not
    seven; a start-up choice below the cores left is kept."""
    from load_follower import threads_for

    assert threads_for(0.2, 8, 8) == 8
    assert threads_for(0.3, 8, 8) == 7
    assert threads_for(1.0, 8, 8) == 7
    assert threads_for(1.24, 8, 8) == 7
    assert threads_for(1.25, 8, 8) == 6
    assert threads_for(2.5, 8, 8) == 5
    assert threads_for(30.0, 8, 8) == 1
    assert threads_for(1.0, 4, 8) == 4  # four chosen of eight: three more were free
    assert threads_for(5.0, 4, 8) == 3  # five held, three left
    assert threads_for(None, 8, 8) == 8

    model = Model({8: 0.10, 7: 0.11, 6: 0.12})
    follower = model.follower(8, [1.0] * 3 + [1.5] * 3 + [0.05], cores=8)
    # One core held: 7 timed against 8, 8 kept; a second core held: 6 against 8, 8 kept.
    assert model.run(follower, 8) == [8, 7, 8, 8, 6, 8, 8, 8]
    assert follower.batches[7] == 1 and follower.batches[6] == 1


def test_the_load_suggestion_rises_only_clear_of_its_bound() -> None:
    """A neighbour hovering at the bound does not flip the trial's pair every batch."""
    from load_follower import BUSY_CORES, RISE_MARGIN

    below = BUSY_CORES - 0.01  # under the bound, but not by RISE_MARGIN: still busy
    clear = BUSY_CORES - RISE_MARGIN - 0.01
    model = Model({1: 1.0, 2: 1.2})
    follower = model.follower(2, [1.0, below, below, clear])
    assert model.run(follower, 5) == [2, 1, 2, 1, 2]


def test_every_precision_on_a_cpu_with_threads_unpinned_follows_the_load() -> None:
    """Whether fewer threads pay beside a neighbour was measured to differ by CPU for the same
    precision, so every precision is timed; a GPU and a pinned TORCH_THREADS are never touched."""
    from load_follower import follows_load

    assert follows_load("cpu", pinned=False)
    assert not follows_load("cpu", pinned=True)
    assert not follows_load("cuda:0", pinned=False)


def test_a_one_thread_choice_stays_one_thread() -> None:
    """The tiny model's start-up choice (one thread) is never widened by a quiet machine."""
    model = Model({1: 0.01})
    follower = model.follower(1, [0.0, 1.0, 0.0])
    assert model.run(follower, 3) == [1, 1, 1]
    assert model.applied == [] and follower.batches == {1: 3}


def test_short_batches_are_measured_together() -> None:
    """Batches shorter than FOLLOW_MIN_S keep the count; the next choice measures all of them
    (10 ms ticks cannot tell a neighbour in a few tens of milliseconds), and a trial gives each
    count at least FOLLOW_MIN_S of them."""
    from load_follower import FOLLOW_MIN_S

    step = FOLLOW_MIN_S / 4  # per batch, on either count
    model = Model({1: step * 0.875, 2: step})  # binary fractions: the sums are exact
    follower = model.follower(2, [1.0, 1.0, 1.0, 0.0])
    ran = model.run(follower, 18, images=1)
    assert ran == [2] * 4 + [1] * 5 + [2] * 4 + [1] * 5
    assert model.applied == [1, 2, 1]


def run_on_one_thread(work: Callable[[], object]) -> object:
    """`work` on a thread of its own, as the inference worker runs (the count is per thread)."""
    done: list[object] = []
    worker = threading.Thread(target=lambda: done.append(work()))
    worker.start()
    worker.join(timeout=60)
    assert done, "the worker did not finish"
    return done[0]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is nothing to choose")
def test_a_neighbour_that_comes_and_goes_is_followed_on_the_worker_thread() -> None:
    """A real busy process: the next batch runs on one thread, and within seconds of it leaving
    the batches get every core again; torch's own setting says so on that thread. (Two of the
    machine's cores: one busy neighbour holds one of them.)"""
    import torch

    def scenario() -> dict[str, object]:
        with busy_neighbour():  # running for 0.3 s when the follower starts measuring
            follower = LoadFollower(torch.get_num_threads(), torch.set_num_threads, cores=2)
            time.sleep(1.0)
            busy = follower.before_batch(), torch.get_num_threads()
        back = []
        for _ in range(QUIET_TRIES):  # one-second intervals after the neighbour left
            time.sleep(1.0)
            back.append(follower.before_batch())
            if back[-1] == follower.quiet:
                break
        return {
            "quiet": follower.quiet,
            "busy": busy,
            "back": back,
            "now": torch.get_num_threads(),
        }

    seen = run_on_one_thread(scenario)
    assert isinstance(seen, dict)
    assert seen["quiet"] >= 2
    assert seen["busy"] == (1, 1)
    assert seen["back"][-1] == seen["quiet"] == seen["now"], seen


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is nothing to choose")
def test_metrics_count_batches_by_the_threads_they_ran_on(serve_app, base_settings) -> None:
    """A real server (TORCH_THREADS unset): batches beside a busy neighbour run on one thread
    fewer (one, on two cores), and /metrics says how many ran on each count and what the model
    runs on now."""
    assert base_settings.torch_threads is None
    quiet = threads_of_a_new_thread()
    beside_one = max(1, min(quiet, len(os.sched_getaffinity(0)) - 1))  # one core held
    server = serve_app(base_settings.with_overrides(cache_size=0))
    data = two_red_circles()
    assert_success(post_png(server.url, data))  # the interval since load
    with busy_neighbour():
        time.sleep(1.0)
        assert_success(post_png(server.url, data))
        beside = scrape(server.url)
    assert beside.value("blip2_model_threads") == beside_one
    assert beside.value("blip2_model_thread_batches_total", threads=str(beside_one)) >= 1
    after = beside
    for _ in range(QUIET_TRIES):
        time.sleep(1.0)
        assert_success(post_png(server.url, data))
        after = scrape(server.url)
        if after.value("blip2_model_threads") == quiet:
            break
    assert after.value("blip2_model_threads") == quiet
    ran = {
        labels["threads"]: after.value("blip2_model_thread_batches_total", **labels)
        for labels in after.labelled("blip2_model_thread_batches_total")
    }
    assert set(ran) == {str(n) for n in range(1, quiet + 1)}  # every count it could choose
    assert sum(ran.values()) == after.value("blip2_model_batch_size_count")
    assert ran[str(quiet)] >= 1 and ran[str(beside_one)] >= 1
