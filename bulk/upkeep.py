"""Job housekeeping on one thread: expiry with spool cleanup, and callback delivery.

Every tick: jobs past their retention (JOBS_TTL) are deleted from the store and their spooled
uploads from disk; upload directories a crash left behind are swept now and then; and finished
jobs whose `callback_url` is due are POSTed (on a small pool, so one slow receiver does not hold
up the others). A failed callback is retried with exponential backoff and given up after
`attempts` calls, which the store records (``callback.state`` = ``failed``). The due state is
durable (the store sets it in the transaction that ends the job); attempt counts are not, so a
restart starts a job's attempts afresh: callbacks are delivered at least once.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bulk.jobs import JobStore, JobStoreError, JobView

if TYPE_CHECKING:
    from bulk.callbacks import CallbackSender
    from bulk.spool import Spool

log = logging.getLogger(__name__)

CALLBACK_WORKERS = 2
PENDING_LIMIT = 64
SWEEP_INTERVAL = 60.0


def callback_body(view: JobView) -> dict[str, Any]:
    """What a callback receiver gets: the job's status and where its results are."""
    body = view.to_dict()
    body["results_url"] = f"/v3/jobs/{view.job_id}/results"
    return body


@dataclass
class _Attempts:
    made: int = 0
    next_due: float = 0.0


class Upkeep:
    """The housekeeping thread; :meth:`tick` does one round (also callable from tests)."""

    def __init__(
        self,
        store: JobStore,
        spool: Spool,
        sender: CallbackSender,
        *,
        attempts: int,
        backoff: float,
        interval: float = 0.5,
        expire_interval: float = 5.0,
    ) -> None:
        self.store = store
        self.spool = spool
        self.sender = sender
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.interval = interval
        self.expire_interval = expire_interval
        self._pool = cf.ThreadPoolExecutor(CALLBACK_WORKERS, thread_name_prefix="job-callback")
        self._thread = threading.Thread(target=self._loop, name="job-upkeep", daemon=True)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tries: dict[str, _Attempts] = {}
        self._sending: set[str] = set()
        self._next_expire = 0.0
        self._next_sweep = 0.0

    def start(self) -> Upkeep:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # housekeeping must never die
                log.exception("job upkeep failed; trying again")

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now >= self._next_expire:
            self._next_expire = now + self.expire_interval
            self._expire()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self.spool.sweep_incomplete()
        self._callbacks(now)

    def _expire(self) -> None:
        try:
            expired = self.store.expire()
        except JobStoreError as exc:
            log.error("could not expire jobs: %s", exc.message)
            return
        for job in expired:
            self.spool.remove(job.spool_dir)

    # -- callbacks ---------------------------------------------------------------------------

    def _callbacks(self, now: float) -> None:
        try:
            due = self.store.pending_callbacks(PENDING_LIMIT)
        except JobStoreError as exc:
            log.error("could not read pending callbacks: %s", exc.message)
            return
        for view in due:
            with self._lock:
                tries = self._tries.setdefault(view.job_id, _Attempts())
                if view.job_id in self._sending or tries.next_due > now:
                    continue
                self._sending.add(view.job_id)
            try:
                self._pool.submit(self._deliver, view)
            except RuntimeError:  # stopping
                return

    def _deliver(self, view: JobView) -> None:
        assert view.callback_url is not None
        try:
            problem = self.sender.post(view.callback_url, callback_body(view))
            with self._lock:
                tries = self._tries.setdefault(view.job_id, _Attempts())
                tries.made += 1
                tries.next_due = time.monotonic() + self.backoff * 2 ** (tries.made - 1)
                made = tries.made
            if problem is None:
                log.info("job %s: callback delivered", view.job_id)
                self._done(view.job_id, True, None)
            elif made >= self.attempts:
                log.warning(
                    "job %s: callback failed %d times (%s); giving up", view.job_id, made, problem
                )
                self._done(view.job_id, False, f"{problem} (after {made} attempts)")
            else:
                log.info("job %s: callback attempt %d failed: %s", view.job_id, made, problem)
        finally:
            with self._lock:
                self._sending.discard(view.job_id)

    def _done(self, job_id: str, delivered: bool, error: str | None) -> None:
        try:
            self.store.callback_done(job_id, delivered, error)
        except JobStoreError as exc:
            log.error("job %s: could not record the callback: %s", job_id, exc.message)
            return
        with self._lock:
            self._tries.pop(job_id, None)
