"""The job worker: claims job items from a `JobStore`, captions them at bulk priority, records.

One thread claims items (oldest job first) and keeps at most `capacity` of them in flight on a
small pool, so the batcher can merge them into full batches while interactive requests still
go first (bulk priority, see captioning/batcher.py). Outcomes are recorded as they finish, a few
per store transaction; the store keeps the first outcome of an item, so a claim that went stale
and ran twice is still stored once.

Only the :class:`bulk.jobs.JobStore` protocol is used, so the same worker runs against the
embedded SQLite store or, on several replicas, a shared one (issue 10): claims carry this
worker's id, a dead worker's claims come back after the claim timeout, and a restarted service
(same `worker_id`) takes its predecessor's back at once (:meth:`JobWorker.start`).

Stopping (:meth:`stop`, on SIGTERM): no new claims; the items in flight finish (the batcher is
still running) and are recorded; whatever could not finish in time is released for the next
start. Items of a job that was cancelled or failed while they waited are not run: they are
released once nothing else is in flight, which marks them skipped.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from typing import TYPE_CHECKING

from bulk.inputs import SpooledFileMissing, item_source
from bulk.jobs import ClaimedItem, JobStore, JobStoreError, Outcome
from captioning.batcher import BULK
from captioning.errors import (
    DeadlineExceeded,
    NotReady,
    Overloaded,
    ServiceError,
    ShuttingDown,
)
from captioning.options import GenerationOptions, tags_requested

if TYPE_CHECKING:
    from bulk.spool import Spool
    from captioning.pipeline import Pipeline
    from image_input.sources import ImageReader

log = logging.getLogger(__name__)

JOB_STATE_TTL = 0.2  # seconds a job's state is trusted before asking the store again
RETRY_PAUSE = 0.2  # seconds between attempts when the model's bulk queue is full
COALESCE_PAUSE = 0.003  # seconds to let the rest of a finished batch's items come in
GONE = "the job's uploaded files are gone"


class ItemRunner:
    """Runs one claimed item through the pipeline; its Outcome, or None when it was not run
    (its job ended, or the service is stopping) and must be released instead."""

    def __init__(
        self,
        store: JobStore,
        pipeline: Pipeline,
        reader: ImageReader,
        spool: Spool,
        *,
        item_timeout: float,
        give_up_after: float,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.reader = reader
        self.spool = spool
        self.item_timeout = item_timeout
        self.give_up_after = give_up_after
        self.stopping = threading.Event()
        self._states: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def __call__(self, item: ClaimedItem) -> Outcome | None:
        if not self.job_running(item.ref.job_id):
            return None
        source = item_source(item.input_ref, self.reader, self.spool, item.source)
        if isinstance(source, str):
            return Outcome(item.ref, error=source)
        try:
            options = GenerationOptions.from_public(item.options)
            tags = tags_requested(item.options)
        except ServiceError as exc:  # stored by an older version with other ranges
            return Outcome(item.ref, error=exc.message)
        return self._caption(item, source, options, tags)

    def _caption(
        self, item: ClaimedItem, source: object, options: GenerationOptions, tags: bool
    ) -> Outcome | None:
        give_up = time.monotonic() + self.give_up_after
        while not self.stopping.is_set() and time.monotonic() < give_up:
            try:
                result = self.pipeline.caption(
                    source,  # type: ignore[arg-type]
                    options,
                    deadline=time.monotonic() + self.item_timeout,
                    tags=tags,
                    priority=BULK,
                )
            except (Overloaded, DeadlineExceeded):
                # Interactive work comes first: wait for room, keep the claim.
                self.stopping.wait(RETRY_PAUSE)
                continue
            except (ShuttingDown, NotReady):
                return None
            except SpooledFileMissing:
                log.error("job %s: spooled upload missing; failing the job", item.ref.job_id)
                self._fail_job(item.ref.job_id)
                return None
            except ServiceError as exc:
                return Outcome(item.ref, error=exc.message)
            except Exception:
                log.exception("job item %s failed unexpectedly", item.ref)
                return Outcome(item.ref, error="internal error while captioning this image")
            return Outcome(item.ref, result={"predictions": result.predictions})
        return None

    def _fail_job(self, job_id: str) -> None:
        try:
            self.store.fail_job(job_id, GONE)
        except JobStoreError as exc:
            log.error("job %s could not be failed: %s", job_id, exc.message)
        with self._lock:
            self._states[job_id] = (time.monotonic(), False)

    def job_running(self, job_id: str) -> bool:
        """Whether the job still wants its items run (not cancelled, failed or gone)."""
        now = time.monotonic()
        with self._lock:
            known = self._states.get(job_id)
        if known is not None and now - known[0] < JOB_STATE_TTL:
            return known[1]
        try:
            view = self.store.get(job_id)
        except JobStoreError:
            return True  # the store will refuse the outcome if the job has gone
        running = view is not None and not view.finished
        with self._lock:
            if len(self._states) > 1000:
                self._states.clear()
            self._states[job_id] = (now, running)
        return running


class JobWorker:
    """One claiming thread and a pool of `capacity` item threads."""

    def __init__(
        self,
        store: JobStore,
        run_item: ItemRunner,
        *,
        worker_id: str,
        capacity: int,
        poll_interval: float = 1.0,
    ) -> None:
        self.store = store
        self.run_item = run_item
        self.worker_id = worker_id
        self.capacity = max(1, capacity)
        self.poll_interval = poll_interval
        self.items_recorded = 0
        self._pool = cf.ThreadPoolExecutor(self.capacity, thread_name_prefix="job-item")
        self._thread = threading.Thread(target=self._loop, name="job-worker", daemon=True)
        self._wake = threading.Event()
        self._no_claims = threading.Event()  # set by stop_claiming()
        self._stopped = threading.Event()  # set when the loop has ended
        self._inflight: dict[cf.Future[Outcome | None], ClaimedItem] = {}
        self._unrecorded: list[Outcome] = []
        self._abandoned = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> JobWorker:
        """Take back the claims a previous process with this worker id left, then run."""
        try:
            released = self.store.release_claims(self.worker_id)
        except JobStoreError as exc:
            log.error("could not release earlier claims: %s", exc.message)
            released = 0
        if released:
            log.info("resuming: %d job items claimed before a restart are pending again", released)
        self._thread.start()
        return self

    def wake(self) -> None:
        """A job was created: look for work now rather than at the next poll."""
        self._wake.set()

    def stop_claiming(self) -> None:
        """Take no new items (draining); the ones in flight go on."""
        self._no_claims.set()
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """Stop claiming, let the items in flight finish for up to `timeout` s and record them,
        then release what is left. True when nothing was left unfinished."""
        self.stop_claiming()
        finished = self._stopped.wait(timeout) if self._thread.is_alive() else True
        self.run_item.stopping.set()  # items still waiting give up
        if not finished:
            self._stopped.wait(5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            released = self.store.release_claims(self.worker_id)
        except JobStoreError as exc:
            log.error("could not release claims at stop: %s", exc.message)
            released = 0
        if released:
            log.info("%d job items released for the next start", released)
        return finished and released == 0

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self.run_item.stopping.is_set():
                claimed = self._claim()
                if self._no_claims.is_set() and not self._inflight:
                    break
                self._collect(wait=not claimed)
                self._record()
                if self._abandoned and not self._inflight:
                    self._release_abandoned()
            self._record()
        except Exception:
            log.exception("job worker stopped unexpectedly")
        finally:
            self._stopped.set()

    def _claim(self) -> int:
        room = self.capacity - len(self._inflight)
        if self._no_claims.is_set() or self._abandoned or room <= 0:
            return 0
        try:
            items = self.store.claim(self.worker_id, room)
        except JobStoreError as exc:
            log.error("could not claim job items: %s", exc.message)
            return 0
        for item in items:
            self._inflight[self._pool.submit(self.run_item, item)] = item
        return len(items)

    def _collect(self, *, wait: bool) -> None:
        """Take the outcomes of finished items; wait for one when there was nothing to claim."""
        if not self._inflight:
            if wait:
                self._wake.wait(self.poll_interval)
                self._wake.clear()
            return
        timeout = self.poll_interval if wait else 0.0
        done, _ = cf.wait(list(self._inflight), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        if done:  # a batch's items finish together: record them in one transaction
            time.sleep(COALESCE_PAUSE)
            done = {future for future in self._inflight if future.done()}
        for future in done:
            item = self._inflight.pop(future)
            outcome = future.result() if not future.cancelled() else None
            if outcome is None:
                self._abandoned = True
            else:
                self._unrecorded.append(outcome)
            log.debug("job item %s finished", item.ref)

    def _record(self) -> None:
        if not self._unrecorded:
            return
        try:
            self.items_recorded += self.store.record(self._unrecorded)
        except JobStoreError as exc:
            log.error("could not record %d outcomes: %s", len(self._unrecorded), exc.message)
            time.sleep(self.poll_interval)  # kept; tried again on the next turn
            return
        self._unrecorded = []

    def _release_abandoned(self) -> None:
        """Items not run (their job ended) go back: the store marks them skipped."""
        try:
            self.store.release_claims(self.worker_id)
        except JobStoreError as exc:
            log.error("could not release skipped items: %s", exc.message)
            return
        self._abandoned = False
