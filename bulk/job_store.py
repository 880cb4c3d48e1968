"""The embedded job store: jobs, items and results in one SQLite file that survives crashes.

Peer services keep jobs in memory and lose them on restart. Here every state change is one
SQLite transaction in WAL mode (``synchronous=FULL`` by default, so a committed result survives a
power cut as well as a ``kill -9``): after a crash the file holds exactly the committed outcomes,
:meth:`SqliteJobStore.release_claims` at start-up puts the dead process's claimed items back, and
unfinished jobs resume where they stopped. A result is written only while its item has none, so
no item is ever counted or stored twice.

One connection per store, guarded by a lock (SQLite serialises writers anyway); write
transactions are ``BEGIN IMMEDIATE`` with a busy timeout, so several stores or processes can share
one file. See :mod:`bulk.jobs` for the protocol and docs/bulk.md for the guarantees.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bulk.jobs import (
    MAX_PAGE,
    ClaimedItem,
    ExpiredJob,
    ItemRef,
    ItemResult,
    JobCounts,
    JobStoreConfig,
    JobView,
    NewItem,
    Outcome,
    SpoolQuotaExceeded,
    StoreFull,
    StoreStats,
    TooManyJobs,
    check_new_job,
    clip_message,
    stored_outcome,
    to_json,
)
from bulk.sqlite_db import SqliteDb

log = logging.getLogger(__name__)

SCHEMA = Path(__file__).with_name("job_schema.sql")
SCHEMA_VERSION = 1  # statements run one by one (executescript would commit)
_JOB_COLUMNS = (
    "seq, id, state, created_at, started_at, finished_at, expires_at, options, callback_url, "
    "callback_state, error"
)
_GAVE_UP = "gave up after {attempts} attempts: processing stopped each time (crash or timeout)"


class SqliteJobStore:
    """:class:`bulk.jobs.JobStore` on one SQLite file (created if missing)."""

    def __init__(
        self,
        path: str | Path,
        config: JobStoreConfig | None = None,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, NORMAL or EXTRA")
        self.config = config or JobStoreConfig()
        if self.config.claim_timeout <= 0 or self.config.max_attempts < 1:
            raise ValueError("claim_timeout must be positive and max_attempts at least 1")
        self.path = Path(path)
        self._clock = clock
        self._db = SqliteDb(
            self.path,
            SCHEMA.read_text(encoding="utf-8"),
            SCHEMA_VERSION,
            synchronous=synchronous.upper(),
            busy_timeout=busy_timeout,
        )
        self._write = self._db.write
        self._read = self._db.read

    def close(self) -> None:
        self._db.close()

    # -- creating ------------------------------------------------------------------------------

    def create_job(
        self,
        items: Sequence[NewItem],
        options: Mapping[str, Any],
        *,
        callback_url: str | None = None,
        spool_dir: str | None = None,
        spool_bytes: int = 0,
    ) -> str:
        check_new_job(self.config, items, callback_url)
        options_json = to_json(dict(options), "options")
        job_id = secrets.token_urlsafe(16)
        now = self._clock()
        with self._write() as tx:
            self._check_room(tx, len(items), spool_bytes)
            seq = tx.execute(
                "INSERT INTO jobs (id, state, created_at, expires_at, options, callback_url,"
                " total, spool_dir, spool_bytes) VALUES (:id, 'queued', :now, :expires,"
                " :options, :url, :total, :spool_dir, :spool_bytes)",
                {
                    "id": job_id,
                    "now": now,
                    "expires": now + self.config.ttl_seconds,
                    "options": options_json,
                    "url": callback_url,
                    "total": len(items),
                    "spool_dir": spool_dir,
                    "spool_bytes": spool_bytes,
                },
            ).lastrowid
            tx.executemany(
                "INSERT INTO items (job_seq, idx, source, input_ref, state)"
                " VALUES (?, ?, ?, ?, 'pending')",
                ((seq, i, item.source, item.input_ref) for i, item in enumerate(items)),
            )
        log.info("job %s created with %d items", job_id, len(items))
        return job_id

    def _check_room(self, tx: sqlite3.Connection, new_items: int, spool_bytes: int) -> None:
        """The concurrent-job, stored-item and spool bounds, inside the creating transaction."""
        unfinished = tx.execute(
            "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
        ).fetchone()[0]
        if unfinished >= self.config.max_unfinished_jobs:
            raise TooManyJobs(
                f"{unfinished} jobs are already queued or running (at most "
                f"{self.config.max_unfinished_jobs}); try again when one has finished"
            )
        stored = tx.execute("SELECT COALESCE(SUM(total), 0) FROM jobs").fetchone()[0]
        if stored + new_items > self.config.max_stored_items:
            raise StoreFull("the job store is full; try again when older jobs have expired")
        quota = self.config.max_spool_bytes
        if quota is not None and spool_bytes > 0:
            used = tx.execute("SELECT COALESCE(SUM(spool_bytes), 0) FROM jobs").fetchone()[0]
            if used + spool_bytes > quota:
                raise SpoolQuotaExceeded(
                    "not enough job storage left for these uploads; try again later"
                )

    # -- working -------------------------------------------------------------------------------

    def claim(self, worker_id: str, limit: int) -> list[ClaimedItem]:
        if limit <= 0:
            return []
        now = self._clock()
        with self._write() as tx:
            self._release(tx, "claimed_at < ?", (now - self.config.claim_timeout,), now)
            rows = tx.execute(
                "SELECT job_seq, idx, source, input_ref, attempts FROM items"
                " WHERE state = 'pending' ORDER BY job_seq, idx LIMIT ?",
                (limit,),
            ).fetchall()
            tx.executemany(
                "UPDATE items SET state = 'claimed', claimed_by = ?, claimed_at = ?,"
                " attempts = attempts + 1 WHERE job_seq = ? AND idx = ?",
                ((worker_id, now, seq, idx) for seq, idx, *_ in rows),
            )
            jobs = self._start_jobs(tx, {row[0] for row in rows}, now)
        return [
            ClaimedItem(ItemRef(jobs[seq][0], idx), source, ref, jobs[seq][1], attempts + 1)
            for seq, idx, source, ref, attempts in rows
        ]

    def _start_jobs(
        self, tx: sqlite3.Connection, seqs: set[int], now: float
    ) -> dict[int, tuple[str, dict[str, Any]]]:
        """Mark queued jobs running; each job's id and options."""
        jobs: dict[int, tuple[str, dict[str, Any]]] = {}
        for seq in seqs:
            tx.execute(
                "UPDATE jobs SET state = 'running', started_at = ?"
                " WHERE seq = ? AND state = 'queued'",
                (now, seq),
            )
            job_id, options = tx.execute(
                "SELECT id, options FROM jobs WHERE seq = ?", (seq,)
            ).fetchone()
            jobs[seq] = (job_id, json.loads(options))
        return jobs

    def record(self, outcomes: Sequence[Outcome]) -> int:
        now = self._clock()
        recorded = 0
        with self._write() as tx:
            touched: set[int] = set()
            for outcome in outcomes:
                seq = self._record_one(tx, outcome, now)
                if seq is not None:
                    recorded += 1
                    touched.add(seq)
            self._settle(tx, touched, now)
        return recorded

    def _record_one(self, tx: sqlite3.Connection, outcome: Outcome, now: float) -> int | None:
        """Write one outcome if the item has none yet; the job's seq if written."""
        state, result, error = stored_outcome(self.config, outcome)
        row = tx.execute(
            "UPDATE items SET state = ?, result = ?, error = ?, finished_at = ?,"
            " claimed_by = NULL, claimed_at = NULL"
            " WHERE job_seq = (SELECT seq FROM jobs WHERE id = ?) AND idx = ?"
            " AND state IN ('pending', 'claimed') RETURNING job_seq",
            (state, result, error, now, outcome.ref.job_id, outcome.ref.index),
        ).fetchone()
        return None if row is None else row[0]

    def complete(self, ref: ItemRef, result: Mapping[str, Any]) -> bool:
        return self.record([Outcome(ref, result=result)]) == 1

    def fail_item(self, ref: ItemRef, message: str) -> bool:
        return self.record([Outcome(ref, error=message)]) == 1

    def release_claims(self, worker_id: str | None = None) -> int:
        now = self._clock()
        with self._write() as tx:
            if worker_id is None:
                return self._release(tx, "1", (), now)
            return self._release(tx, "claimed_by = ?", (worker_id,), now)

    def release_stale(self, now: float | None = None) -> int:
        now = self._clock() if now is None else now
        with self._write() as tx:
            return self._release(tx, "claimed_at < ?", (now - self.config.claim_timeout,), now)

    def _release(
        self, tx: sqlite3.Connection, where: str, params: tuple[Any, ...], now: float
    ) -> int:
        """Claimed items matching `where` go back to pending (skipped in an ended job; an error
        once they have used up their attempts)."""
        rows = tx.execute(
            "SELECT items.job_seq, items.idx, items.attempts, jobs.state FROM items"
            " JOIN jobs ON jobs.seq = items.job_seq"
            f" WHERE items.state = 'claimed' AND {where}",
            params,
        ).fetchall()
        for seq, idx, attempts, job_state in rows:
            state, error = "pending", None
            if job_state in ("cancelled", "failed"):
                state = "skipped"
            elif attempts >= self.config.max_attempts:
                state, error = "error", _GAVE_UP.format(attempts=attempts)
            tx.execute(
                "UPDATE items SET state = ?, error = ?, claimed_by = NULL, claimed_at = NULL,"
                " finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END"
                " WHERE job_seq = ? AND idx = ?",
                (state, error, state, now, seq, idx),
            )
        if rows:
            log.info("released %d claimed job items", len(rows))
            self._settle(tx, {row[0] for row in rows}, now)
        return len(rows)

    def _settle(self, tx: sqlite3.Connection, seqs: set[int], now: float) -> None:
        """Mark each running job whose items all have an outcome done."""
        for seq in seqs:
            left = tx.execute(
                "SELECT EXISTS (SELECT 1 FROM items WHERE job_seq = ?"
                " AND state IN ('pending', 'claimed'))",
                (seq,),
            ).fetchone()[0]
            if not left:
                self._finish(tx, seq, "done", None, now, ("queued", "running"))

    def _finish(
        self,
        tx: sqlite3.Connection,
        seq: int,
        state: str,
        error: str | None,
        now: float,
        from_states: tuple[str, ...],
    ) -> bool:
        """Move a job to a final state; its retention starts now. False if it had ended."""
        marks = ",".join("?" * len(from_states))
        changed = tx.execute(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, expires_at = ?,"
            " callback_state = CASE WHEN callback_url IS NULL THEN NULL ELSE 'pending' END"
            f" WHERE seq = ? AND state IN ({marks}) RETURNING id",
            (state, error, now, now + self.config.ttl_seconds, seq, *from_states),
        ).fetchone()
        if changed:
            log.info("job %s %s", changed[0], state)
        return changed is not None

    # -- ending --------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobView | None:
        return self._end(job_id, "cancelled", None)

    def fail_job(self, job_id: str, message: str) -> JobView | None:
        return self._end(job_id, "failed", clip_message(message))

    def _end(self, job_id: str, state: str, error: str | None) -> JobView | None:
        """End an unfinished job; items not yet claimed are skipped, claimed ones may finish."""
        now = self._clock()
        with self._write() as tx:
            found = tx.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if found is None:
                return None
            if self._finish(tx, found[0], state, error, now, ("queued", "running")):
                tx.execute(
                    "UPDATE items SET state = 'skipped', finished_at = ?"
                    " WHERE job_seq = ? AND state = 'pending'",
                    (now, found[0]),
                )
            return self._view(tx, job_id)

    def expire(self, now: float | None = None) -> list[ExpiredJob]:
        now = self._clock() if now is None else now
        with self._read() as tx:
            due = tx.execute(
                "SELECT seq, id, spool_dir FROM jobs WHERE expires_at <= ? ORDER BY seq", (now,)
            ).fetchall()
        expired: list[ExpiredJob] = []
        for seq, job_id, spool_dir in due:  # one job per transaction: short write locks
            with self._write() as tx:
                if tx.execute("DELETE FROM jobs WHERE seq = ?", (seq,)).rowcount:
                    expired.append(ExpiredJob(job_id, spool_dir))
        if expired:
            log.info("expired %d jobs", len(expired))
        return expired

    # -- callbacks -----------------------------------------------------------------------------

    def pending_callbacks(self, limit: int = 10) -> list[JobView]:
        with self._read() as tx:
            ids = tx.execute(
                "SELECT id FROM jobs WHERE callback_state = 'pending' ORDER BY finished_at LIMIT ?",
                (limit,),
            ).fetchall()
            views = [self._view(tx, job_id) for (job_id,) in ids]
        return [view for view in views if view is not None]

    def callback_done(self, job_id: str, delivered: bool, error: str | None = None) -> None:
        state = "delivered" if delivered else "failed"
        with self._write() as tx:
            tx.execute(
                "UPDATE jobs SET callback_state = ?, callback_error = ?"
                " WHERE id = ? AND callback_state = 'pending'",
                (state, clip_message(error) if error else None, job_id),
            )

    # -- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView | None:
        with self._read() as tx:
            return self._view(tx, job_id)

    def _view(self, tx: sqlite3.Connection, job_id: str) -> JobView | None:
        row = tx.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        seq, job_id, state, created, started, finished, expires, options, url, cb_state, err = row
        by_state = dict(
            tx.execute(
                "SELECT state, COUNT(*) FROM items WHERE job_seq = ? GROUP BY state", (seq,)
            ).fetchall()
        )
        counts = JobCounts(
            total=sum(by_state.values()),
            pending=by_state.get("pending", 0),
            running=by_state.get("claimed", 0),
            done=by_state.get("done", 0),
            error=by_state.get("error", 0),
            skipped=by_state.get("skipped", 0),
        )
        return JobView(
            job_id, state, created, started, finished, expires, json.loads(options), url,
            cb_state, err, counts,
        )  # fmt: skip

    def results(self, job_id: str, offset: int = 0, limit: int = 100) -> list[ItemResult] | None:
        with self._read() as tx:
            found = tx.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if found is None:
                return None
            return self._page(tx, found[0], max(0, offset), min(max(0, limit), MAX_PAGE))

    def iter_results(self, job_id: str, page_size: int = 500) -> Iterator[ItemResult]:
        with self._read() as tx:
            found = tx.execute("SELECT seq FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if found is None:
            return
        page_size = min(max(1, page_size), MAX_PAGE)
        offset = 0
        while True:
            with self._read() as tx:  # one short read per page: writers are never held up
                page = self._page(tx, found[0], offset, page_size)
            yield from page
            if len(page) < page_size:
                return
            offset += page_size

    @staticmethod
    def _page(tx: sqlite3.Connection, seq: int, offset: int, limit: int) -> list[ItemResult]:
        rows = tx.execute(
            "SELECT idx, source, state, result, error, attempts FROM items"
            " WHERE job_seq = ? AND idx >= ? AND idx < ? ORDER BY idx",
            (seq, offset, offset + limit),
        ).fetchall()
        return [
            ItemResult(idx, source, state, json.loads(result) if result else None, error, attempts)
            for idx, source, state, result, error, attempts in rows
        ]

    def stats(self) -> StoreStats:
        with self._read() as tx:
            unfinished = tx.execute(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchone()[0]
            pending = tx.execute("SELECT COUNT(*) FROM items WHERE state = 'pending'").fetchone()
            running = tx.execute("SELECT COUNT(*) FROM items WHERE state = 'claimed'").fetchone()
            spool = tx.execute("SELECT COALESCE(SUM(spool_bytes), 0) FROM jobs").fetchone()
        return StoreStats(unfinished, pending[0], running[0], spool[0])
