"""The Redis job store (several replicas) against a real redis-server: exactly once, reclaim of a
dead replica's items, cancel, limits, expiry, callbacks, outages."""

from __future__ import annotations

import threading
import time

import pytest

from bulk.jobs import (
    ItemRef,
    JobStore,
    JobStoreConfig,
    NewItem,
    Outcome,
    SpoolQuotaExceeded,
    StoreFull,
    StoreUnavailable,
    TooManyJobs,
)
from bulk.redis_job_store import RedisJobStore


def items(n: int, prefix: str = "img") -> list[NewItem]:
    return [NewItem(f"{prefix}{i}.png", f"/spool/{prefix}{i}.png") for i in range(n)]


@pytest.fixture
def store(redis_server: str):
    made: list[RedisJobStore] = []

    def make(clock=time.time, **config) -> RedisJobStore:
        s = RedisJobStore(redis_server, JobStoreConfig(**config), clock=clock)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_satisfies_the_protocol(store) -> None:
    assert isinstance(store(), JobStore)


def test_two_replicas_run_every_item_exactly_once(store) -> None:
    replicas = [store(), store()]
    job = replicas[0].create_job(items(120), {"num_beams": 3}, callback_url=None)
    assert replicas[1].get(job).state == "queued"
    seen: list[tuple[str, ItemRef]] = []
    lock = threading.Lock()

    def work(name: str, s: RedisJobStore) -> None:
        while True:
            claimed = s.claim(name, 7)
            if not claimed:
                return
            with lock:
                seen.extend((name, c.ref) for c in claimed)
            assert all(c.options == {"num_beams": 3} and c.attempts == 1 for c in claimed)
            s.record([Outcome(c.ref, result={"caption": f"c{c.ref.index}"}) for c in claimed])

    threads = [
        threading.Thread(target=work, args=(f"replica-{i % 2}-worker-{i}", s))
        for i, s in enumerate(replicas * 2)  # two workers per replica
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    refs = [ref for _, ref in seen]
    assert sorted(r.index for r in refs) == list(range(120))  # each once
    replica_of = {name: name.split("-worker")[0] for name, _ in seen}
    assert set(replica_of.values()) == {"replica-0", "replica-1"}  # spread over replicas
    view = replicas[1].get(job)
    assert view.state == "done" and view.counts.done == 120 and view.progress == 1.0
    lines = [r.to_dict() for r in replicas[0].iter_results(job, page_size=50)]
    assert [line["index"] for line in lines] == list(range(120))
    assert lines[5] == {"index": 5, "source": "img5.png", "status": "success", "caption": "c5"}
    # A late duplicate (a replica presumed dead comes back) changes nothing.
    assert replicas[0].complete(ItemRef(job, 5), {"caption": "late"}) is False
    assert replicas[0].results(job, 5, 1)[0].result == {"caption": "c5"}


def test_a_dead_replicas_items_are_reclaimed_after_the_claim_timeout(store) -> None:
    dead, alive = store(claim_timeout=0.5), store(claim_timeout=0.5)
    job = alive.create_job(items(10), {})
    held = dead.claim("dead", 4)  # then it is killed: no outcome, no release
    assert [c.ref.index for c in held] == [0, 1, 2, 3]
    first = alive.claim("alive", 10)
    assert [c.ref.index for c in first] == [4, 5, 6, 7, 8, 9]  # not the held ones, yet
    alive.record([Outcome(c.ref, result={"ok": True}) for c in first])
    assert alive.claim("alive", 10) == []
    time.sleep(0.7)
    again = alive.claim("alive", 10)
    assert [c.ref.index for c in again] == [0, 1, 2, 3]
    assert all(c.attempts == 2 for c in again)
    alive.record([Outcome(c.ref, result={"ok": True}) for c in again])
    view = alive.get(job)
    assert view.state == "done" and view.counts.done == 10 and view.counts.running == 0


def test_released_claims_are_handed_out_again_at_once(store) -> None:
    s = store(claim_timeout=60)
    job = s.create_job(items(3), {})
    assert len(s.claim("stopping", 3)) == 3
    assert s.get(job).counts.running == 3
    assert s.release_claims("stopping") == 3
    assert s.get(job).counts.pending == 3
    assert sorted(c.ref.index for c in s.claim("next", 3)) == [0, 1, 2]


def test_an_item_that_keeps_killing_its_worker_is_given_up(store) -> None:
    s = store(claim_timeout=0.2, max_attempts=2)
    job = s.create_job(items(1), {})
    for _ in range(2):
        assert len(s.claim("w", 1)) == 1
        time.sleep(0.3)
    assert s.claim("w", 1) == []
    view = s.get(job)
    assert view.state == "done" and view.counts.error == 1
    assert "gave up" in s.results(job)[0].error


def test_cancel_skips_pending_items_and_keeps_finished_ones(store) -> None:
    s = store()
    job = s.create_job(items(6), {}, callback_url="http://127.0.0.1:9/hook")
    running = s.claim("w", 2)
    s.complete(running[0].ref, {"caption": "kept"})
    view = s.cancel(job)
    assert view.state == "cancelled" and view.counts.skipped == 4 and view.counts.running == 1
    assert s.complete(running[1].ref, {"caption": "finished after cancel"})  # still recorded
    assert s.claim("w", 10) == []  # skipped items never run
    statuses = [r.to_dict()["status"] for r in s.iter_results(job)]
    assert statuses == ["success", "success", "skipped", "skipped", "skipped", "skipped"]
    assert [v.job_id for v in s.pending_callbacks()] == [job]
    s.callback_done(job, delivered=True)
    assert s.pending_callbacks() == [] and s.get(job).callback_state == "delivered"
    assert s.cancel("no-such-job") is None


def test_limits(store) -> None:
    s = store(max_unfinished_jobs=2, max_stored_items=10, max_spool_bytes=1000)
    s.create_job(items(3), {}, spool_bytes=400)
    s.create_job(items(3), {}, spool_bytes=400)
    with pytest.raises(TooManyJobs):
        s.create_job(items(1), {})
    roomy = store(max_unfinished_jobs=10, max_stored_items=10, max_spool_bytes=1000)
    with pytest.raises(StoreFull):
        roomy.create_job(items(5), {})
    with pytest.raises(SpoolQuotaExceeded):
        roomy.create_job(items(1), {}, spool_bytes=300)


def test_expiry_removes_the_job_and_gives_back_its_spool(store) -> None:
    clock = [1000.0]
    s = store(clock=lambda: clock[0], ttl_seconds=60)
    job = s.create_job(items(2), {}, spool_dir="/spool/job-1", spool_bytes=10)
    s.record([Outcome(c.ref, error="bad image") for c in s.claim("w", 2)])
    assert s.get(job).state == "done" and s.expire(now=clock[0] + 59) == []
    gone = s.expire(now=clock[0] + 61)
    assert [(g.job_id, g.spool_dir) for g in gone] == [(job, "/spool/job-1")]
    assert s.get(job) is None and s.results(job) is None
    assert s.stats().spool_bytes == 0


def test_redis_down_is_store_unavailable(redis_server: str) -> None:
    from service_process import free_port

    with pytest.raises(StoreUnavailable):
        RedisJobStore(f"redis://127.0.0.1:{free_port()}/0")
