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
        run_batch: Callable[[Sequence[Item], Any], Sequence[Result]],
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
        `max_bulk_queue` bounds the bulk queue separately (default: `max_queue`)."""
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
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.batches_run = 0
        self.items_run = 0
        self.busy = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Batcher[Item, Result]:
        self._thread.start()
        return self

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
    ) -> Future[Result]:
        """Queue one item; raise QueueFull at once when its priority's queue is at its bound."""
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        job: _Job[Item, Result] = _Job(item, group, options, deadline, priority)
        with self._cond:
            if self._stopping:
                raise WorkerStopped("Service is shutting down")
            queue, bound = (
                (self._bulk, self.max_bulk_queue)
                if priority == BULK
                else (self._queue, self.max_queue)
            )
            if len(queue) >= bound:
                raise QueueFull("Server busy: too many requests queued, retry shortly")
            queue.append(job)
            self._cond.notify_all()
        return job.future

    def run(
        self,
        item: Item,
        options: Any,
        group: Hashable,
        deadline: float,
        priority: str = INTERACTIVE,
    ) -> Result:
        """Submit and wait until the result is ready or `deadline` (time.monotonic) passes."""
        future = self.submit(item, options, group, deadline, priority)
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
            remaining = until - time.monotonic()
            if len(batch) == self.max_batch_size or remaining <= 0 or self._stopping:
                break
            self._cond.wait(timeout=remaining)
        return batch

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
        _notify(self._on_batch, len(jobs), time.monotonic() - started)
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
