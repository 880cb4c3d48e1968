"""bulk.job_store: durable jobs in a real SQLite file, crash-safe and exactly-once.

Real SQLite files in tmp_path; a real child process killed with SIGKILL in the middle of a job;
real threads with their own connections racing for the same items. Time is injected (a settable
clock) only where the test is about timeouts and retention.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

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


class Clock:
    """Settable time for timeout and retention tests."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def items(n: int, prefix: str = "img") -> list[NewItem]:
    return [NewItem(f"{prefix}{i}.png", f"/spool/{prefix}{i}.png") for i in range(n)]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def store(db: Path):
    s = SqliteJobStore(db, synchronous="NORMAL")
    yield s
    s.close()


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


# -- crashes, stale claims, retries ------------------------------------------------------------


def test_a_stale_claim_is_handed_to_another_worker_and_the_first_result_wins(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(claim_timeout=60), clock=clock)
    job_id = store.create_job(items(2), {})
    slow = store.claim("slow", 1)[0]
    clock.now += 59
    assert [c.ref.index for c in store.claim("fast", 5)] == [1]  # item 0's claim is still live
    clock.now += 2
    retry = store.claim("fast", 5)
    assert [c.ref for c in retry] == [slow.ref] and retry[0].attempts == 2
    assert store.complete(slow.ref, {"by": "slow"})  # the slow worker did finish first
    assert not store.complete(retry[0].ref, {"by": "fast"})
    assert store.results(job_id)[0].result == {"by": "slow"}
    store.close()


def test_release_stale_and_release_claims(db: Path) -> None:
    clock = Clock()
    store = SqliteJobStore(db, JobStoreConfig(claim_timeout=60), clock=clock)
    store.create_job(items(6), {})
    store.claim("a", 2)
    clock.now += 30
    store.claim("b", 2)
    clock.now += 31
    assert store.release_stale() == 2  # a's claims are 61 s old, b's 31 s
    assert store.release_claims("nobody") == 0
    assert store.release_claims("b") == 2
    store.claim("c", 3)
    assert store.release_claims() == 3  # start-up after a crash: every claim
    assert store.stats().pending_items == 6
    store.close()


def test_an_item_that_keeps_killing_its_worker_is_given_up(db: Path) -> None:
    store = SqliteJobStore(db, JobStoreConfig(max_attempts=3))
    job_id = store.create_job(items(2), {})
    poison, fine = store.claim("w", 2)
    store.complete(fine.ref, {"caption": "fine"})
    assert poison.attempts == 1
    store.release_claims()  # the worker died while running it
    for attempt in (2, 3):
        (poison,) = store.claim("w", 5)
        assert poison.attempts == attempt
        store.release_claims()  # ... and again
    assert store.claim("w", 5) == []
    view = store.get(job_id)
    assert view.state == "done" and (view.counts.done, view.counts.error) == (1, 1)
    assert store.results(job_id)[0].error.startswith("gave up after 3 attempts")
    store.close()


CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from bulk.job_store import SqliteJobStore
from bulk.jobs import NewItem, Outcome
store = SqliteJobStore({db!r})
job_id = store.create_job(
    [NewItem(f"img{{i}}.png", f"/spool/{{i}}") for i in range({n})], {{"num_beams": 3}}
)
print("job", job_id, flush=True)
while claimed := store.claim("child", 4):
    for item in claimed:
        time.sleep(0.002)
        store.complete(item.ref, {{"caption": f"caption {{item.ref.index}}", "by": "child"}})
        print("done", item.ref.index, flush=True)
"""


def test_kill_9_mid_job_loses_nothing_and_duplicates_nothing(db: Path) -> None:
    n = 300
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), db=str(db), n=n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = child.stdout.readline().split()[1]
        reported: list[int] = []
        deadline = time.monotonic() + 60
        while len(reported) < 100 and time.monotonic() < deadline:
            reported.append(int(child.stdout.readline().split()[1]))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL and len(reported) == 100

    store = SqliteJobStore(db)
    before = store.get(job_id)
    assert before.state == "running" and before.counts.done < n  # really stopped mid-job
    in_flight = {r.index for r in store.results(job_id, 0, n) if r.state == "claimed"}
    assert store.release_claims() == len(in_flight)  # what start-up does after a crash
    rerun: list[int] = []
    while claimed := store.claim("after-restart", 8):
        rerun += [c.ref.index for c in claimed]
        store.record(
            [Outcome(c.ref, result={"caption": f"caption {c.ref.index}", "by": "parent"})
             for c in claimed]
        )  # fmt: skip
    view = store.get(job_id)
    assert view.state == "done" and view.counts.done == n and view.counts.finished == n
    results = list(store.iter_results(job_id))
    assert [r.index for r in results] == list(range(n))  # every item once, in order
    assert all(r.result["caption"] == f"caption {r.index}" for r in results)
    by_child = {r.index for r in results if r.result["by"] == "child"}
    assert set(reported) <= by_child  # everything the child finished survived the kill
    assert not by_child & set(rerun)  # and was not run again
    assert len(by_child) + len(rerun) == n
    assert all(r.attempts == (2 if r.index in in_flight else 1) for r in results)
    store.close()


CREATOR = """
import sys
sys.path.insert(0, {root!r})
from bulk.job_store import SqliteJobStore
from bulk.jobs import JobStoreConfig, NewItem
store = SqliteJobStore({db!r}, JobStoreConfig(max_unfinished_jobs=1000))
for n in range(1, 1000):
    job_id = store.create_job([NewItem(f"{{i}}", f"{{i}}") for i in range(2000 + n)], {{}})
    print(job_id, flush=True)
"""


def test_kill_9_while_creating_jobs_leaves_only_whole_jobs(db: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CREATOR.format(root=str(ROOT), db=str(db))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        created = [child.stdout.readline().strip() for _ in range(5)]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
    store = SqliteJobStore(db)
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT jobs.id, jobs.total, COUNT(items.idx) FROM jobs"
        " LEFT JOIN items ON items.job_seq = jobs.seq GROUP BY jobs.seq"
    ).fetchall()
    conn.close()
    assert set(created) <= {job_id for job_id, _, _ in rows}
    assert all(total == count for _, total, count in rows)  # no half-written job
    store.close()


def test_threads_with_their_own_connections_finish_every_item_exactly_once(db: Path) -> None:
    n, workers = 600, 4
    setup = SqliteJobStore(db)
    job_ids = [setup.create_job(items(n // 3, f"j{j}-"), {"job": j}) for j in range(3)]
    recorded: Counter[str] = Counter()
    claimed: Counter[tuple[str, int]] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        store = SqliteJobStore(db)  # a connection of its own: real SQLite locking
        rng = random.Random(name)
        try:
            while batch := store.claim(name, rng.randint(1, 9)):
                with lock:
                    claimed.update(c.ref for c in batch)
                time.sleep(rng.uniform(0, 0.003))  # "inference": lets the others in
                outcomes = [Outcome(c.ref, result={"by": name}) for c in batch]
                count = store.record(outcomes)
                with lock:
                    recorded[name] += count
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            store.close()

    def meddle() -> None:
        """Completes random items behind the workers' backs: only first outcomes may count."""
        store = SqliteJobStore(db)
        rng = random.Random(7)
        try:
            for _ in range(300):
                ref = ItemRef(rng.choice(job_ids), rng.randrange(n // 3))
                with lock:
                    recorded["meddler"] += store.complete(ref, {"by": "meddler"})
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    threads.append(threading.Thread(target=meddle))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert sum(recorded.values()) == n  # no outcome counted twice, none lost
    assert max(claimed.values()) == 1  # no item handed out twice
    for job_id in job_ids:
        view = setup.get(job_id)
        assert view.state == "done" and view.counts.done == n // 3
        stored = Counter(r.result["by"] for r in setup.iter_results(job_id))
        assert sum(stored.values()) == n // 3
    total_by = Counter()
    for job_id in job_ids:
        total_by.update(r.result["by"] for r in setup.iter_results(job_id))
    assert total_by == recorded - Counter()  # what each thread was told it recorded is stored
    assert len([name for name in recorded if name.startswith("w") and recorded[name]]) > 1
    setup.close()


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


# -- the file ---------------------------------------------------------------------------------


def test_the_file_is_wal_and_survives_reopening(db: Path) -> None:
    store = SqliteJobStore(db)
    job_id = store.create_job(items(3), {"a": [1, 2]})
    store.complete(store.claim("w", 1)[0].ref, {"caption": "persisted"})
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    again = SqliteJobStore(db)
    view = again.get(job_id)
    assert view.options == {"a": [1, 2]} and view.counts.done == 1
    assert again.results(job_id)[0].result == {"caption": "persisted"}
    again.close()


def test_a_newer_schema_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JobStoreError, match="schema version 99"):
        SqliteJobStore(db)


def test_a_file_that_is_not_a_database_is_a_clear_error(db: Path) -> None:
    db.write_bytes(b"this is not a database, just some text that fills a page. " * 100)
    with pytest.raises(JobStoreError, match="cannot open the job store"):
        SqliteJobStore(db)


def test_missing_folders_are_created(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "a" / "b" / "jobs.db")
    assert store.create_job(items(1), {})
    store.close()


def test_stats(store: SqliteJobStore) -> None:
    store.create_job(items(4), {}, spool_bytes=123)
    store.claim("w", 1)
    stats = store.stats()
    assert (stats.unfinished_jobs, stats.pending_items, stats.running_items) == (1, 3, 1)
    assert stats.spool_bytes == 123


def test_a_result_cannot_overwrite_the_item_s_own_fields(store: SqliteJobStore) -> None:
    job_id = store.create_job(items(1), {})
    store.complete(ItemRef(job_id, 0), {"index": 99, "status": "forged", "predictions": []})
    line = store.results(job_id)[0].to_dict()
    assert line == {"index": 0, "source": "img0.png", "status": "success", "predictions": []}


def test_item_result_lines_are_json(store: SqliteJobStore) -> None:
    job_id = store.create_job([NewItem("ünïcode ✓.png", "/s/1")], {})
    store.complete(store.claim("w", 1)[0].ref, {"predictions": [{"text": "ok"}]})
    line = json.dumps(next(store.iter_results(job_id)).to_dict(), ensure_ascii=False)
    assert json.loads(line)["source"] == "ünïcode ✓.png"
