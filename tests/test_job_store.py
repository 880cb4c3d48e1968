"""bulk.job_store: durable jobs in a real SQLite file: the life of a job, cancelling and failing,
retention, limits and callbacks.

Real SQLite files in tmp_path. Time is injected (a settable clock) only where the test is about
timeouts and retention. Crashes, stale claims, racing threads and the file itself are in
test_job_store_durability.py.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from bulk.job_store import SqliteJobStore
from bulk.jobs import (
    InvalidJob,
    ItemRef,
    JobStore,
    JobStoreConfig,
    JobStoreError,
    NewItem,
    Outcome,
    SpoolQuotaExceeded,
    StoreFull,
    StoreUnavailable,
    TooManyItems,
    TooManyJobs,
)
from job_store_helpers import Clock, items
from job_store_helpers import db as db  # a fixture, imported for pytest
from job_store_helpers import store as store  # a fixture, imported for pytest


def run_all(store: SqliteJobStore, worker: str = "w", batch: int = 5) -> int:
    """Claim and complete everything there is; how many outcomes were recorded."""
    recorded = 0
    while claimed := store.claim(worker, batch):
        recorded += store.record(
            [Outcome(c.ref, result={"caption": f"{c.source} by {worker}"}) for c in claimed]
        )
    return recorded


# -- the life of a job -----------------------------------------------------------------------


def test_a_job_goes_queued_running_done_with_counts_and_timestamps(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(ttl_seconds=100), clock=clock)
    assert isinstance(store, JobStore)  # the protocol the Redis store will also satisfy
    job_id = store.create_job(items(5), {"num_beams": 3}, callback_url="http://cb/x")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", job_id)
    view = store.get(job_id)
    assert view is not None and view.state == "queued" and view.counts.total == 5
    assert view.started_at is None and view.expires_at == clock.now + 100
    assert view.options == {"num_beams": 3} and view.progress == 0.0

    clock.now += 1
    claimed = store.claim("worker-a", 2)
    assert [c.ref for c in claimed] == [ItemRef(job_id, 0), ItemRef(job_id, 1)]
    assert claimed[0].options == {"num_beams": 3} and claimed[0].attempts == 1
    assert claimed[0].source == "img0.png" and claimed[0].input_ref == "/spool/img0.png"
    view = store.get(job_id)
    assert view.state == "running" and view.started_at == clock.now
    assert (view.counts.pending, view.counts.running) == (3, 2)

    assert store.complete(claimed[0].ref, {"predictions": [{"text": "a cat"}]})
    assert store.fail_item(claimed[1].ref, "Invalid image: not a supported image format")
    view = store.get(job_id)
    assert (view.counts.done, view.counts.error, view.progress) == (1, 1, 0.4)

    clock.now += 1
    run_all(store)
    view = store.get(job_id)
    assert view.state == "done" and view.finished_at == clock.now and view.progress == 1.0
    assert view.expires_at == clock.now + 100  # retention counts from the end
    assert view.counts.to_dict() == {
        "total": 5, "pending": 0, "running": 0, "done": 4, "error": 1, "skipped": 0,
    }  # fmt: skip
    assert view.to_dict()["state"] == "done" and view.to_dict()["finished_at"].endswith("+00:00")
    store.close()


def test_results_in_item_order_with_status_and_paging(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(7), {})
    claimed = store.claim("w", 7)
    store.record(
        [Outcome(c.ref, result={"predictions": [{"text": f"t{c.ref.index}"}]}) for c in claimed[:4]]
        + [Outcome(claimed[4].ref, error="Invalid image: truncated or corrupt image data")]
    )
    page = store.results(job_id, offset=3, limit=3)
    assert [r.to_dict() for r in page] == [
        {"index": 3, "source": "img3.png", "status": "success", "predictions": [{"text": "t3"}]},
        {"index": 4, "source": "img4.png", "status": "error",
         "error": "Invalid image: truncated or corrupt image data"},
        {"index": 5, "source": "img5.png", "status": "running"},
    ]  # fmt: skip
    assert [r.index for r in store.results(job_id, 0, 100)] == list(range(7))
    assert store.results(job_id, 7, 10) == [] and store.results(job_id, -5, 2)[0].index == 0
    assert store.results(job_id, 0, 0) == []
    assert store.results("no-such-job") is None and store.get("no-such-job") is None


def test_iter_results_reads_page_by_page_in_order(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(1234), {})
    run_all(store, batch=100)
    seen = [r.index for r in store.iter_results(job_id, page_size=100)]
    assert seen == list(range(1234))
    assert list(store.iter_results("no-such-job")) == []


def test_pages_are_bounded(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(2500), {})
    assert len(store.results(job_id, 0, 10**9)) == 1000
    assert sum(1 for _ in store.iter_results(job_id, page_size=10**9)) == 2500


def test_iter_results_does_not_block_writers_between_pages(store: SqliteJobStore) -> None:
    first = store.create_job(items(30), {})
    second = store.create_job(items(3, "other"), {})
    stream = store.iter_results(first, page_size=10)
    next(stream)
    assert run_all(store) == 33  # the open stream holds no lock and no transaction
    assert sum(1 for _ in stream) == 29
    assert store.get(second).state == "done"


def test_claims_take_the_oldest_job_first_and_never_hand_out_an_item_twice(
    store: SqliteJobStore,
) -> None:
    old = store.create_job(items(3, "old"), {"n": 1})
    new = store.create_job(items(3, "new"), {"n": 2})
    first = store.claim("a", 4)
    assert [c.ref for c in first] == [ItemRef(old, 0), ItemRef(old, 1), ItemRef(old, 2),
                                      ItemRef(new, 0)]  # fmt: skip
    assert [c.options for c in first] == [{"n": 1}] * 3 + [{"n": 2}]
    second = store.claim("b", 10)
    assert [c.ref for c in second] == [ItemRef(new, 1), ItemRef(new, 2)]
    assert store.claim("c", 10) == [] and store.claim("c", 0) == []


def test_the_first_outcome_wins_and_later_ones_are_ignored(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(3), {})
    a, b, c = store.claim("w", 3)
    assert store.complete(a.ref, {"caption": "first"})
    assert not store.complete(a.ref, {"caption": "second"})
    assert not store.fail_item(a.ref, "late error")
    assert store.fail_item(b.ref, "bad image")
    assert not store.complete(b.ref, {"caption": "too late"})
    assert store.record([Outcome(c.ref, result={"x": 1}), Outcome(c.ref, result={"x": 2})]) == 1
    assert not store.complete(ItemRef(job_id, 99), {"x": 1})
    assert not store.complete(ItemRef("no-such-job", 0), {"x": 1})
    got = [r.to_dict() for r in store.results(job_id)]
    assert got[0]["caption"] == "first" and got[1]["error"] == "bad image" and got[2]["x"] == 1
    assert store.get(job_id).counts.finished == 3


def test_an_unclaimed_item_can_be_recorded_directly(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(2), {})
    # e.g. an item the edge already knows is bad (a zip entry that is not an image)
    assert store.fail_item(ItemRef(job_id, 1), "not an image")
    assert [c.ref.index for c in store.claim("w", 5)] == [0]


# -- cancelling and failing ---------------------------------------------------------------


def test_cancel_skips_pending_items_and_keeps_finished_results(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(10), {}, callback_url="http://cb/done")
    claimed = store.claim("w", 3)
    store.complete(claimed[0].ref, {"caption": "kept"})
    view = store.cancel(job_id)
    assert view is not None and view.state == "cancelled" and view.finished_at is not None
    assert (view.counts.done, view.counts.running, view.counts.skipped) == (1, 2, 7)
    assert store.claim("w", 10) == []  # nothing of a cancelled job is handed out
    assert store.complete(claimed[1].ref, {"caption": "in flight when cancelled"})
    store.release_claims("w")  # the other in-flight item is abandoned: skipped, not pending
    view = store.get(job_id)
    assert view.state == "cancelled"
    assert (view.counts.done, view.counts.running, view.counts.skipped) == (2, 0, 8)
    statuses = [r.to_dict()["status"] for r in store.results(job_id)]
    assert statuses == ["success", "success"] + ["skipped"] * 8
    assert store.results(job_id)[0].result == {"caption": "kept"}
    assert [v.job_id for v in store.pending_callbacks()] == [job_id]  # the job ended
    assert store.cancel(job_id).state == "cancelled" and store.cancel("nope") is None


def test_cancelling_a_finished_job_changes_nothing(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(2), {})
    run_all(store)
    assert store.cancel(job_id).state == "done"
    assert store.fail_job(job_id, "too late").state == "done"


def test_fail_job_ends_it_with_a_reason(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(4), {})
    store.complete(store.claim("w", 1)[0].ref, {"caption": "one"})
    view = store.fail_job(job_id, "the spooled uploads are gone")
    assert view.state == "failed" and view.error == "the spooled uploads are gone"
    assert (view.counts.done, view.counts.skipped) == (1, 3)
    assert view.to_dict()["error"] == "the spooled uploads are gone"


# -- retention, limits, callbacks ------------------------------------------------------------


def test_expire_removes_jobs_past_retention_and_returns_their_spool_dirs(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(ttl_seconds=100), clock=clock)
    finished = store.create_job(items(2), {}, spool_dir="/jobs/a", spool_bytes=10)
    clock.now += 50
    run_all(store)  # finished at +50: kept until +150
    never_run = store.create_job(items(2, "x"), {}, spool_dir="/jobs/b")  # +50: until +150
    clock.now += 10
    later = store.create_job(items(1, "s"), {})  # +60: until +160
    clock.now += 89
    assert store.expire() == []
    clock.now += 2
    expired = store.expire()
    assert [(e.job_id, e.spool_dir) for e in expired] == [
        (finished, "/jobs/a"),
        (never_run, "/jobs/b"),
    ]
    assert store.get(later) is not None
    assert store.get(finished) is None and store.results(finished) is None
    assert not store.complete(ItemRef(finished, 0), {"late": True})
    assert store.stats().spool_bytes == 0
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 1  # only `later` has items
    conn.close()
    store.close()


def test_an_unfinished_job_expires_a_ttl_after_creation(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(ttl_seconds=100), clock=clock)
    job_id = store.create_job(items(3), {})
    store.claim("w", 1)
    clock.now += 101
    assert [e.job_id for e in store.expire()] == [job_id]
    store.close()


def test_limits_give_clear_errors(db: Path) -> None:
    config = JobStoreConfig(max_items_per_job=10, max_unfinished_jobs=2, max_spool_bytes=1000)
    store = SqliteJobStore(db, config)
    with pytest.raises(TooManyItems, match="at most 10 items, got 11"):
        store.create_job(items(11), {})
    with pytest.raises(InvalidJob, match="at least one item"):
        store.create_job([], {})
    with pytest.raises(InvalidJob, match="options must be JSON"):
        store.create_job(items(1), {"x": object()})
    with pytest.raises(InvalidJob, match="too long"):
        store.create_job([NewItem("x" * 5000, "ref")], {})
    first = store.create_job(items(2), {}, spool_bytes=600)
    with pytest.raises(SpoolQuotaExceeded):
        store.create_job(items(2), {}, spool_bytes=500)
    store.create_job(items(2), {}, spool_bytes=400)
    with pytest.raises(TooManyJobs, match="2 jobs are already queued or running"):
        store.create_job(items(1), {})
    store.cancel(first)
    store.create_job(items(1), {})  # room again once one has ended
    assert isinstance(TooManyJobs("x"), JobStoreError) and TooManyJobs("m").message == "m"
    store.close()


def test_kept_items_are_bounded_finished_jobs_included(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(max_stored_items=10, ttl_seconds=60), clock=clock)
    store.create_job(items(6), {})
    run_all(store)
    with pytest.raises(StoreFull, match="full"):
        store.create_job(items(5), {})
    clock.now += 30
    store.create_job(items(4), {})
    clock.now += 31
    assert len(store.expire()) == 1  # the finished job's retention is over
    store.create_job(items(5), {})
    store.close()


def test_a_database_locked_too_long_is_a_clear_error_and_the_store_recovers(db: Path) -> None:
    store = SqliteJobStore(db, busy_timeout=0.2)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="try again later"):
        store.create_job(items(1), {})
    assert time.monotonic() - started < 2
    other.execute("COMMIT")
    other.close()
    job_id = store.create_job(items(1), {})  # not left inside a broken transaction
    assert store.get(job_id).state == "queued"
    store.close()


def test_a_result_over_the_size_bound_becomes_an_item_error(db: Path) -> None:
    store = SqliteJobStore(db, JobStoreConfig(max_result_bytes=100))
    job_id = store.create_job(items(2), {})
    a, b = store.claim("w", 2)
    assert store.complete(a.ref, {"text": "x" * 200})
    assert store.complete(b.ref, {"text": float("nan")})  # not JSON: stored as an error
    first, second = store.results(job_id)
    assert first.state == "error" and first.error == "the result is too large to store"
    assert second.state == "error" and "could not be stored" in second.error
    store.close()


def test_callbacks_are_pending_until_marked(store: SqliteJobStore) -> None:
    with_cb = store.create_job(items(1), {}, callback_url="http://127.0.0.1:9/cb")
    without = store.create_job(items(1, "n"), {})
    assert store.pending_callbacks() == []  # nothing has ended yet
    run_all(store)
    pending = store.pending_callbacks()
    assert [v.job_id for v in pending] == [with_cb]
    assert pending[0].callback_url == "http://127.0.0.1:9/cb" and pending[0].state == "done"
    assert store.get(without).callback_state is None
    store.callback_done(with_cb, delivered=False, error="connection refused after 5 tries")
    assert store.pending_callbacks() == [] and store.get(with_cb).callback_state == "failed"


def test_the_sqlite_store_has_the_protocol_s_exact_signatures() -> None:
    import inspect

    for name, member in inspect.getmembers(JobStore, inspect.isfunction):
        if not name.startswith("_"):
            ours = inspect.signature(getattr(SqliteJobStore, name))
            assert ours == inspect.signature(member), name
