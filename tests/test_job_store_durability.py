"""bulk.job_store: crash-safe and exactly-once, and the SQLite file itself.

A real child process killed with SIGKILL in the middle of a job (and while creating jobs); real
threads with their own connections racing for the same items; stale claims handed on and poison
items given up; the file reopened, refused when newer or not a database, and what is read back
from it (stats, result lines). Time is injected (a settable clock) only where the test is about
claim timeouts.
"""

from __future__ import annotations

import json
import os
import random
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
from bulk.jobs import ItemRef, JobStoreConfig, JobStoreError, NewItem, Outcome
from job_store_helpers import Clock, items
from job_store_helpers import db as db  # a fixture, imported for pytest
from job_store_helpers import store as store  # a fixture, imported for pytest

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
