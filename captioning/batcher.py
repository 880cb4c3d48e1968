"""One inference worker fed by a bounded queue, batching requests that decode alike.

The model is not thread-safe and a 2-core CPU gains nothing from running two forward passes at
once, so exactly one worker thread calls it. HTTP threads `submit` work and wait on a future with
their own deadline. Requests whose generation options are equal are merged into one batch of up to
`max_batch_size`, waiting at most `batch_wait_ms` after the first one arrives (the caller says
which requests may share a batch by giving them the same `group`). The worker knows
nothing about the model: it calls `run_batch(images, options)` (Hugging Face TGI keeps its router
apart from the model in the same way). Nor does it know about metrics: optional observer hooks
hear how long each job waited in its queue (`on_dequeue`) and the size and model time of each
batch that ran (`on_batch`); a failing hook is logged and never stops the worker.

Two priorities, each with its own bounded queue: `interactive` (the default: HTTP callers) and
`bulk` (job items). The worker starts a batch from the bulk queue only when no interactive
request waits; interactive requests of the same group join a bulk-led batch while it gathers,
and a gathering bulk batch gives way (goes back to the front of its queue) when an interactive
request of another group arrives. So an interactive caller waits at most for the batch that is
already running, never behind a job's backlog.

Admission at the door: :meth:`reserve` takes a place in the interactive queue before the caller
reads, decodes or prepares its image, and refuses with `QueueFull` (503 + Retry-After) when there
is none; a later `submit` with that reservation is never refused for the bound. While reserved
requests of the same group are being prepared (:meth:`Reservation.arriving`), a gathering batch
waits for them (bounded by a share of the last batch's run time), so N closed-loop clients make
batches of N instead of alternating cohorts, and their preparation does not overlap the batch.

The model may be loaded on the worker thread itself (`start(setup=...)`): with libgomp each
thread that runs torch owns an OpenMP team, so loading, warming up and serving on one thread
keeps one team in the process.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from captioning.admission import Reservation
from captioning.errors import DeadlineExceeded, Overloaded, ShuttingDown

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

INTERACTIVE = "interactive"
BULK = "bulk"
PRIORITIES = (INTERACTIVE, BULK)


class QueueFull(Overloaded):
    """The queue is at MAX_QUEUE; the caller should retry later."""


class WorkerStopped(ShuttingDown):
    """The worker was stopped while the request was waiting."""


#: Longest wait for reserved requests still being prepared, and its share of the last batch.
MAX_ARRIVAL_WAIT_S = 2.0
ARRIVAL_WAIT_SHARE = 0.25


@dataclass
class _Job(Generic[Item, Result]):
    item: Item
    group: Hashable
    options: Any
    deadline: float
    priority: str = INTERACTIVE
    future: Future[Result] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def _fail(future: Future[Any], exc: BaseException) -> None:
    """Fail a future unless its caller already gave up on it (cancelled after its deadline)."""
    with contextlib.suppress(InvalidStateError):
        future.set_exception(exc)


def _notify(hook: Callable[..., None] | None, *args: Any) -> None:
    """Call an observer hook; its failure is logged, never raised into the worker."""
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        log.exception("batcher observer hook failed")


def _is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory, detected without importing torch here."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


class Batcher(Generic[Item, Result]):
    """Bounded queue + single worker thread with dynamic batching and per-request deadlines."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Item], Any], Sequence[Result]] | None,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: int = 10,
        max_queue: int = 64,
        max_bulk_queue: int | None = None,
        name: str = "inference-worker",
        on_batch: Callable[[int, float], None] | None = None,
        on_dequeue: Callable[[float, str], None] | None = None,
    ) -> None:
        """`on_batch(size, seconds)`: after each successful model call; `on_dequeue(seconds,
        priority)`: once per job, with the time it waited from `submit` until its batch started.
        `max_bulk_queue` bounds the bulk queue separately (default: `max_queue`). `run_batch`
        may be None when `start(setup=...)` returns it from the worker thread."""
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._on_dequeue = on_dequeue
        self.max_batch_size = max(1, max_batch_size)
        self.batch_wait = max(0, batch_wait_ms) / 1000.0
        self.max_queue = max(1, max_queue)
        self.max_bulk_queue = max(1, max_bulk_queue or max_queue)
        self._queue: deque[_Job[Item, Result]] = deque()
        self._bulk: deque[_Job[Item, Result]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._reserved = 0  # reservations held (count against max_queue)
        self._arriving: dict[Hashable, int] = {}  # of those, being prepared, by group
        self._last_batch_s = 0.0
        self._last_size, self._last_group = 0, None  # of the last interactive-led batch
        self._setup: Callable[[], Callable[[Sequence[Item], Any], Sequence[Result]]] | None = None
        self._setup_done = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run_thread, name=name, daemon=True)
        self.batches_run = 0
        self.items_run = 0
        self.busy = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(
        self,
        setup: Callable[[], Callable[[Sequence[Item], Any], Sequence[Result]]] | None = None,
    ) -> Batcher[Item, Result]:
        """Start the worker thread. `setup` runs on it first (load and warm the model there)
        and returns `run_batch`; see :meth:`wait_setup`."""
        self._setup = setup
        if setup is None:
            self._setup_done.set()
        self._thread.start()
        return self

    def wait_setup(self, poll_s: float = 1.0) -> None:
        """Block until `setup` finished on the worker thread; re-raise its exception. Bounded by
        the worker's own life: each wait lasts `poll_s`, and a dead worker ends it."""
        while not self._setup_done.wait(timeout=poll_s):
            if not self._thread.is_alive():
                break
        if self._setup_error is not None:
            raise self._setup_error
        if not self._setup_done.is_set():
            raise WorkerStopped("the inference worker stopped before the model was ready")

    def _run_thread(self) -> None:
        if self._setup is not None:
            try:
                self._run_batch = self._setup()
            except BaseException as exc:  # handed to wait_setup's caller
                self._setup_error = exc
                self._setup_done.set()
                return
            self._setup_done.set()
        self._loop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking work, fail what is queued, and wait briefly for the running batch."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue) + list(self._bulk)
            self._queue.clear()
            self._bulk.clear()
            self._cond.notify_all()
        for job in pending:
            _fail(job.future, WorkerStopped("Service is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Finish what is queued and running (for at most `timeout` seconds), then stop.

        Returns True when everything finished; work still queued at the timeout is failed with
        WorkerStopped by :meth:`stop`.
        """
        until = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while (self._queue or self._bulk or self.busy) and time.monotonic() < until:
                self._cond.wait(timeout=min(0.05, max(0.0, until - time.monotonic())))
            idle = not self._queue and not self._bulk and not self.busy
        self.stop()
        return idle

    @property
    def depth(self) -> int:
        """Interactive requests waiting (not counting the batch being run)."""
        return len(self._queue)

    @property
    def reserved(self) -> int:
        """Places taken at the door by requests still reading or preparing their image."""
        return self._reserved

    def reserve(self, group: Hashable) -> Reservation:
        """A place in the interactive queue for a request of `group`, or QueueFull at once.
        Queued jobs plus reservations never exceed `max_queue`."""
        with self._cond:
            if self._stopping:
                raise WorkerStopped("Service is shutting down")
            if len(self._queue) + self._reserved >= self.max_queue:
                raise QueueFull("Server busy: too many requests queued, retry shortly")
            self._reserved += 1
            return Reservation(self, group)

    def _mark_arriving(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.held and not reservation.is_arriving:
                reservation.is_arriving = True
                group = reservation.group
                self._arriving[group] = self._arriving.get(group, 0) + 1

    def _release_locked(self, reservation: Reservation) -> None:
        if not reservation.held:
            return
        reservation.held = False
        self._reserved -= 1
        if reservation.is_arriving:
            group = reservation.group
            left = self._arriving.get(group, 0) - 1
            if left > 0:
                self._arriving[group] = left
            else:
                self._arriving.pop(group, None)
        self._cond.notify_all()

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            self._release_locked(reservation)

    @property
    def bulk_depth(self) -> int:
        """Bulk (job) items waiting."""
        return len(self._bulk)

    # -- client side -----------------------------------------------------------------------

    def submit(
        self,
        item: Item,
        options: Any,
        group: Hashable,
        deadline: float,
        priority: str = INTERACTIVE,
        reservation: Reservation | None = None,
    ) -> Future[Result]:
        """Queue one item; raise QueueFull at once when its priority's queue is at its bound.
        With a held `reservation` (interactive) the place was taken at the door: no refusal."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        job: _Job[Item, Result] = _Job(item, group, options, deadline, priority)
        with self._cond:
            if self._stopping:
                raise WorkerStopped("Service is shutting down")
            if priority == BULK:
                if len(self._bulk) >= self.max_bulk_queue:
                    raise QueueFull("Server busy: too many requests queued, retry shortly")
                self._bulk.append(job)
            elif reservation is not None and reservation.held:
                self._release_locked(reservation)  # its place becomes the queued job's
                self._queue.append(job)
            else:
                if len(self._queue) + self._reserved >= self.max_queue:
                    raise QueueFull("Server busy: too many requests queued, retry shortly")
                self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def run(
        self,
        item: Item,
        options: Any,
        group: Hashable,
        deadline: float,
        priority: str = INTERACTIVE,
        reservation: Reservation | None = None,
    ) -> Result:
        """Submit and wait until the result is ready or `deadline` (time.monotonic) passes."""
        future = self.submit(item, options, group, deadline, priority, reservation)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            # Not started yet: the worker will drop it. Already running: the result is discarded.
            future.cancel()
            raise DeadlineExceeded("timed out waiting for the model") from None

    # -- worker side -----------------------------------------------------------------------

    def _take_batch(self) -> list[_Job[Item, Result]] | None:
        """Block for the first job (interactive before bulk), then gather same-group jobs until
        the batch or the wait is full."""
        with self._cond:
            while True:
                while not self._stopping:
                    self._drop_dead_locked()
                    if self._queue or self._bulk:
                        break
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return None
                self.busy = True  # from the moment work leaves the queue (drain() watches this)
                first = (self._queue or self._bulk).popleft()
                batch = self._gather_locked(first)
                if batch is not None:
                    return batch
                self.busy = False  # a bulk batch gave way to an interactive request

    def _gather_locked(self, first: _Job[Item, Result]) -> list[_Job[Item, Result]] | None:
        """`first` and the jobs that may share its batch; None when a bulk-led batch gives way
        to an interactive request of another group (its jobs are back at their queues' fronts)."""
        batch = [first]
        bulk_led = first.priority == BULK
        sources = (self._queue, self._bulk) if bulk_led else (self._queue,)
        until = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch_size:
            self._drop_dead_locked()
            if bulk_led and any(job.group != first.group for job in self._queue):
                self._queue.extendleft(reversed([j for j in batch if j.priority != BULK]))
                self._bulk.extendleft(reversed([j for j in batch if j.priority == BULK]))
                return None
            for source in sources:
                for job in list(source):
                    if len(batch) == self.max_batch_size:
                        break
                    if job.group == first.group:
                        source.remove(job)
                        batch.append(job)
            if len(batch) == self.max_batch_size or self._stopping:
                break
            remaining = until - time.monotonic()
            if remaining <= 0:
                remaining = self._arrival_wait_locked(first, len(batch), until)
                if remaining <= 0:
                    break
            self._cond.wait(timeout=remaining)
        return batch

    def _arrival_wait_locked(self, first: _Job[Item, Result], size: int, until: float) -> float:
        """Seconds more to wait for reserved same-group requests already being prepared (they
        are moments away), or, while this batch is smaller than the last interactive one of its
        group, for that batch's callers to come back (closed-loop clients): at most a share of
        the last batch's time, never more than MAX_ARRIVAL_WAIT_S after `batch_wait`. 0: start
        the batch now."""
        if first.priority == BULK:
            return 0.0
        returning = first.group == self._last_group and size < self._last_size
        if not self._arriving.get(first.group) and not returning:
            return 0.0
        patience = min(MAX_ARRIVAL_WAIT_S, ARRIVAL_WAIT_SHARE * self._last_batch_s)
        return until + patience - time.monotonic()

    def _drop_dead_locked(self) -> None:
        """Drop queued jobs that were cancelled or whose deadline passed (work not started)."""
        now = time.monotonic()
        for queue in (self._queue, self._bulk):
            for job in list(queue):
                if job.future.cancelled():
                    queue.remove(job)
                elif job.deadline <= now:
                    queue.remove(job)
                    _fail(job.future, DeadlineExceeded("timed out waiting in the queue"))

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            started = time.monotonic()
            for job in live:
                _notify(self._on_dequeue, started - job.enqueued, job.priority)
            try:
                if live:
                    self._execute(live)
            finally:
                with self._cond:
                    self.busy = False
                    self._cond.notify_all()

    def _execute(self, jobs: list[_Job[Item, Result]]) -> None:
        """Run a batch; on failure isolate the bad item by retrying singly; halve on CUDA OOM."""
        started = time.monotonic()
        try:
            results = self._run_batch([job.item for job in jobs], jobs[0].options)
        except Exception as exc:  # a bad image or an OOM must not fail its neighbours
            if len(jobs) == 1:
                log.warning("inference failed: %s: %s", type(exc).__name__, exc)
                _fail(jobs[0].future, exc)
                return
            if _is_oom(exc):
                _empty_cuda_cache()
                half = len(jobs) // 2
                log.warning(
                    "out of memory with batch %d; retrying as %d + %d",
                    len(jobs),
                    half,
                    len(jobs) - half,
                )
                self._execute(jobs[:half])
                self._execute(jobs[half:])
                return
            log.warning("batch of %d failed (%s); retrying one by one", len(jobs), exc)
            for job in jobs:
                self._execute([job])
            return
        self.batches_run += 1
        self.items_run += len(jobs)
        took = time.monotonic() - started
        self._last_batch_s = took / len(jobs) * self.max_batch_size  # a full batch's time
        if jobs[0].priority == INTERACTIVE:
            self._last_size, self._last_group = len(jobs), jobs[0].group
        _notify(self._on_batch, len(jobs), took)
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)


def _empty_cuda_cache() -> None:
    """Free cached CUDA blocks before retrying smaller; torch is only used if already loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass
