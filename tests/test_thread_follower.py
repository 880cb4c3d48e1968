"""The model's thread count chosen before each batch (`cpu_threads.LoadFollower`, #16): every
core the start-up choice gave while the CPU is quiet, one while other processes hold it. Checked
on measured numbers, with a real busy process beside this one, and through a real waitress
server's /metrics around the tiny model."""

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

from cpu_threads import LoadFollower
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


def ticking(step: float) -> Callable[[], float]:
    """A clock that moves `step` seconds each time it is read (one read per batch)."""
    now = [0.0]

    def read() -> float:
        now[0] += step
        return now[0]

    return read


def test_quiet_keeps_the_start_up_choice_and_busy_gets_one_thread() -> None:
    from cpu_threads import BUSY_CORES, FOLLOW_MIN_S, RISE_MARGIN

    applied: list[int] = []
    below = BUSY_CORES - 0.01  # under the bound, but not by RISE_MARGIN: one thread stays
    clear = BUSY_CORES - RISE_MARGIN - 0.01  # clear of it: every core again
    seen = [0.0, 1.0, 0.67, BUSY_CORES, below, clear, None, 0.02, BUSY_CORES]
    follower = LoadFollower(
        2, applied.append, measure=fed(seen), clock=ticking(FOLLOW_MIN_S), cores=2
    )
    chosen = [follower.before_batch() for _ in seen]
    # 0.67 cores: a neighbour beside two threads of ours; None: /proc/stat unreadable.
    assert chosen == [2, 1, 1, 1, 1, 2, 2, 2, 1]
    assert applied == [1, 2, 1]  # set only when the count changes
    assert follower.threads == 1
    assert follower.batches == {1: 5, 2: 4}


def follower_on(cores: int, applied: list[int], seen: list[float | None]) -> LoadFollower:
    """A follower on `cores` cores that chose all of them, fed `seen`, measuring each batch."""
    from cpu_threads import FOLLOW_MIN_S

    return LoadFollower(
        cores, applied.append, measure=fed(seen), clock=ticking(FOLLOW_MIN_S), cores=cores
    )


def test_on_many_cores_a_neighbour_takes_only_the_cores_it_holds() -> None:
    """Eight cores: HAProxy's third of a core or one busy neighbour costs one thread, not
    seven; a start-up choice below the cores left is kept."""
    from cpu_threads import threads_for

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

    applied: list[int] = []
    follower = follower_on(8, applied, [1.0, 1.0, 0.05])
    assert [follower.before_batch() for _ in range(3)] == [7, 7, 8]
    assert applied == [7, 8] and follower.batches[7] == 2 and follower.batches[8] == 1


def test_only_fp32_on_a_cpu_with_threads_unpinned_follows_the_load() -> None:
    """bf16 beside a neighbour served more on two threads than on one (Intel without AMX), so
    it keeps its start-up count; a GPU and a pinned TORCH_THREADS are never touched."""
    from cpu_threads import follows_load

    assert follows_load("cpu", "fp32", pinned=False)
    assert not follows_load("cpu", "bf16", pinned=False)
    assert not follows_load("cpu", "fp32", pinned=True)
    assert not follows_load("cuda:0", "fp32", pinned=False)


def test_a_one_thread_choice_stays_one_thread() -> None:
    """The tiny model's start-up choice (one thread) is never widened by a quiet machine."""

    applied: list[int] = []
    follower = LoadFollower(
        1, applied.append, measure=fed([0.0, 1.0, 0.0]), clock=ticking(1.0), cores=2
    )
    assert [follower.before_batch() for _ in range(3)] == [1, 1, 1]
    assert applied == [] and follower.batches == {1: 3}


def test_short_batches_are_measured_together() -> None:
    """Batches closer than FOLLOW_MIN_S keep the count; the next choice measures all of them
    (10 ms ticks cannot tell a neighbour in a few tens of milliseconds)."""
    from cpu_threads import FOLLOW_MIN_S

    applied: list[int] = []
    step = FOLLOW_MIN_S / 4
    follower = LoadFollower(
        2, applied.append, measure=fed([1.0, 0.0]), clock=ticking(step), cores=2
    )
    chosen = [follower.before_batch() for _ in range(8)]
    assert chosen == [2, 2, 2, 1, 1, 1, 1, 2]  # measured at the 4th and the 8th
    assert applied == [1, 2] and follower.batches == {1: 4, 2: 4}


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
