"""Jobs shared by every replica: the `JobStore` protocol on Redis, items spread by a stream.

With `REDIS_URL` set, any replica can create a job, answer its status and stream its results,
and every replica's worker takes items from one Redis Stream through one consumer group
(`XREADGROUP`), so a job's items spread over all replicas. An item a replica claimed and never
finished — the replica was killed — stays in the group's pending list; after
`JOB_CLAIM_TIMEOUT` seconds of silence `XAUTOCLAIM` hands it to a live replica.

Every state change is one Lua script, so replicas never race: the first outcome of an item wins
(later ones, from a replica presumed dead that came back, are ignored), the job's counts move
with it, and the job finishes exactly once. Results are stored as the JSON text the worker gave,
never decoded inside Redis. Durability is Redis's: run it with `appendonly yes` (deploy/).

Keys, under `blip2:jobs:v1:`: `job:<id>` (hash: state, times, counts), `items:<id>` (hash:
index → item state as JSON), `results:<id>` (hash: index → result JSON), `stream` + group
`workers`, `unfinished` (set), `expiry` (sorted set), `callbacks` (set), `stored` and
`spool_bytes` (counters).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from bulk.jobs import (
    MAX_PAGE,
    ClaimedItem,
    ExpiredJob,
    ItemRef,
    ItemResult,
    JobCounts,
    JobStoreConfig,
    JobStoreError,
    JobView,
    NewItem,
    Outcome,
    SpoolQuotaExceeded,
    StoreFull,
    StoreStats,
    StoreUnavailable,
    TooManyJobs,
    check_new_job,
    clip_message,
    stored_outcome,
    to_json,
)
from bulk.redis_scripts import CANCEL, CLAIM, CREATE, RECORD, RELEASE

log = logging.getLogger(__name__)

PREFIX = "blip2:jobs:v1:"
GROUP = "workers"
SOCKET_TIMEOUT = 5.0
CLAIM_ROUNDS = 8  # stream reads per claim() when messages turn out to be finished items


class RedisJobStore:
    """The job store for several replicas; one instance per process, thread-safe."""

    def __init__(
        self,
        url: str,
        config: JobStoreConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import redis

        self.config = config or JobStoreConfig()
        self._clock = clock
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            health_check_interval=30,
            decode_responses=True,
        )
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._scripts = {
            name: self._redis.register_script(text)
            for name, text in {
                "create": CREATE,
                "claim": CLAIM,
                "record": RECORD,
                "cancel": CANCEL,
                "release": RELEASE,
            }.items()
        }
        self._call(self._ensure_group)

    # -- plumbing ------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return PREFIX + ":".join(parts)

    def _job_keys(self, job_id: str) -> list[str]:
        return [self._key("job", job_id), self._key("items", job_id), self._key("results", job_id)]

    def _shared_keys(self) -> list[str]:
        return [self._key(name) for name in ("unfinished", "expiry", "callbacks", "stored")]

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a Redis operation; an outage is StoreUnavailable (503), never a crash."""
        try:
            return fn(*args)
        except JobStoreError:
            raise
        except self._errors as exc:
            log.warning("job store (redis) unavailable: %s", exc)
            raise StoreUnavailable("the job store is unavailable, retry shortly") from None

    def _ensure_group(self) -> None:
        try:
            self._redis.xgroup_create(self._key("stream"), GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: another replica made it first
            if "BUSYGROUP" not in str(exc):
                raise

    # -- creating ------------------------------------------------------------------------

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
        job_id = secrets.token_urlsafe(16)
        now = self._clock()
        header = {
            "now": now,
            "expires_at": now + self.config.ttl_seconds,
            "options": to_json(dict(options), "options"),
            "callback_url": callback_url or "",
            "spool_dir": spool_dir or "",
            "spool_bytes": spool_bytes,
            "max_unfinished": self.config.max_unfinished_jobs,
            "max_stored": self.config.max_stored_items,
            "max_spool": -1 if self.config.max_spool_bytes is None else self.config.max_spool_bytes,
        }
        args = [job_id, json.dumps(header)] + [
            json.dumps({"source": item.source, "input_ref": item.input_ref}) for item in items
        ]
        keys = [*self._job_keys(job_id), *self._shared_keys(), self._key("spool_bytes")]
        keys.append(self._key("stream"))
        refused = self._call(self._scripts["create"], keys, args)
        if refused:
            kind, message = refused
            raise {"jobs": TooManyJobs, "stored": StoreFull, "spool": SpoolQuotaExceeded}[kind](
                message
            )
        log.info("job %s created with %d items", job_id, len(items))
        return job_id

    # -- working -------------------------------------------------------------------------

    def claim(self, worker_id: str, limit: int) -> list[ClaimedItem]:
        claimed: list[ClaimedItem] = []
        stream = self._key("stream")
        idle_ms = int(self.config.claim_timeout * 1000)
        for _ in range(CLAIM_ROUNDS):
            want = limit - len(claimed)
            if want <= 0:
                break
            # Items a silent (dead) replica held, then fresh ones.
            _next, messages, *_ = self._call(
                self._redis.xautoclaim, stream, GROUP, worker_id, idle_ms, "0-0", want
            )
            if len(messages) < want:
                fresh = self._call(
                    self._redis.xreadgroup, GROUP, worker_id, {stream: ">"}, want - len(messages)
                )
                messages += fresh[0][1] if fresh else []
            if not messages:
                break
            for message_id, fields in messages:
                item = self._claim_one(worker_id, message_id, fields)
                if item is not None:
                    claimed.append(item)
        return claimed

    def _claim_one(
        self, worker_id: str, message_id: str, fields: Mapping[str, str] | None
    ) -> ClaimedItem | None:
        if not fields:  # deleted message (its job expired): drop it from the pending list
            self._call(self._redis.xack, self._key("stream"), GROUP, message_id)
            return None
        ref = ItemRef(fields["job"], int(fields["index"]))
        keys = [*self._job_keys(ref.job_id), *self._shared_keys(), self._key("stream")]
        args = [
            ref.index,
            worker_id,
            self._clock(),
            self.config.max_attempts,
            message_id,
            self.config.ttl_seconds,
            ref.job_id,
        ]
        answer = self._call(self._scripts["claim"], keys, args)
        if answer[0] != "claimed":
            return None
        _, attempts, source, input_ref, options = answer
        return ClaimedItem(ref, source, input_ref, json.loads(options), int(attempts))

    def record(self, outcomes: Sequence[Outcome]) -> int:
        new = 0
        pipe = self._redis.pipeline(transaction=False)
        for outcome in outcomes:
            state, result, error = stored_outcome(self.config, outcome)
            ref = outcome.ref
            keys = [*self._job_keys(ref.job_id), *self._shared_keys(), self._key("stream")]
            args = [
                ref.index,
                state,
                result or "",
                error or "",
                self._clock(),
                self.config.ttl_seconds,
                ref.job_id,
            ]
            self._scripts["record"](keys, args, client=pipe)
        for answer in self._call(pipe.execute):
            new += int(answer)
        return new

    def complete(self, ref: ItemRef, result: Mapping[str, Any]) -> bool:
        return self.record([Outcome(ref, result=result)]) == 1

    def fail_item(self, ref: ItemRef, message: str) -> bool:
        return self.record([Outcome(ref, error=message)]) == 1

    def release_claims(self, worker_id: str | None = None) -> int:
        """Hand a worker's (or every worker's) claimed items back to the group at once."""
        return self._release(worker_id, min_idle_ms=0)

    def release_stale(self, now: float | None = None) -> int:
        return self._release(None, min_idle_ms=int(self.config.claim_timeout * 1000))

    def _release(self, worker_id: str | None, min_idle_ms: int) -> int:
        stream = self._key("stream")
        pending = self._call(
            lambda: self._redis.xpending_range(
                stream,
                GROUP,
                min="-",
                max="+",
                count=10_000,
                consumername=worker_id,
                idle=min_idle_ms or None,
            )
        )
        released = 0
        for entry in pending:
            fields = self._call(
                self._redis.xrange, stream, entry["message_id"], entry["message_id"]
            )
            if not fields:
                continue
            ref = ItemRef(fields[0][1]["job"], int(fields[0][1]["index"]))
            keys = self._job_keys(ref.job_id)[:2]
            released += int(self._call(self._scripts["release"], keys, [ref.index]))
            # Idle as long as a dead claim: the next XAUTOCLAIM hands it out first.
            self._call(
                lambda e=entry: self._redis.xclaim(
                    stream,
                    GROUP,
                    "released",
                    0,
                    [e["message_id"]],
                    idle=int(self.config.claim_timeout * 1000) + 1,
                )
            )
        return released

    # -- ending --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> JobView | None:
        return self._end(job_id, "cancelled", "")

    def fail_job(self, job_id: str, message: str) -> JobView | None:
        return self._end(job_id, "failed", clip_message(message))

    def _end(self, job_id: str, state: str, message: str) -> JobView | None:
        keys = [*self._job_keys(job_id), *self._shared_keys()]
        args = [state, message, self._clock(), self.config.ttl_seconds, job_id]
        if not self._call(self._scripts["cancel"], keys, args):
            return None
        return self.get(job_id)

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView | None:
        raw = self._call(self._redis.hgetall, self._key("job", job_id))
        return _view(job_id, raw) if raw else None

    def results(self, job_id: str, offset: int = 0, limit: int = 100) -> list[ItemResult] | None:
        view = self.get(job_id)
        if view is None:
            return None
        stop = min(view.counts.total, max(0, offset) + max(0, min(limit, MAX_PAGE)))
        indices = list(range(max(0, offset), stop))
        if not indices:
            return []
        _, items_key, results_key = self._job_keys(job_id)
        metas = self._call(self._redis.hmget, items_key, indices)
        results = self._call(self._redis.hmget, results_key, indices)
        return [
            _item_result(i, json.loads(meta), result)
            for i, meta, result in zip(indices, metas, results, strict=True)
            if meta is not None
        ]

    def iter_results(self, job_id: str, page_size: int = 500) -> Iterator[ItemResult]:
        offset = 0
        while True:
            page = self.results(job_id, offset, page_size)
            if not page:
                return
            yield from page
            offset += len(page)

    # -- housekeeping --------------------------------------------------------------------

    def expire(self, now: float | None = None) -> list[ExpiredJob]:
        now = self._clock() if now is None else now
        expired = []
        for job_id in self._call(self._redis.zrangebyscore, self._key("expiry"), "-inf", now):
            raw = self._call(self._redis.hgetall, self._key("job", job_id))
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(*self._job_keys(job_id))
            pipe.zrem(self._key("expiry"), job_id)
            pipe.srem(self._key("unfinished"), job_id)
            pipe.srem(self._key("callbacks"), job_id)
            pipe.decrby(self._key("stored"), int(raw.get("total", 0)) if raw else 0)
            pipe.decrby(self._key("spool_bytes"), int(raw.get("spool_bytes", 0)) if raw else 0)
            self._call(pipe.execute)
            expired.append(ExpiredJob(job_id, (raw or {}).get("spool_dir") or None))
        return expired

    def pending_callbacks(self, limit: int = 10) -> list[JobView]:
        ids = self._call(self._redis.srandmember, self._key("callbacks"), limit) or []
        views = [self.get(job_id) for job_id in ids]
        return [v for v in views if v is not None and v.callback_state == "pending"]

    def callback_done(self, job_id: str, delivered: bool, error: str | None = None) -> None:
        pipe = self._redis.pipeline(transaction=True)
        if self._call(self._redis.exists, self._key("job", job_id)):
            pipe.hset(
                self._key("job", job_id),
                mapping={
                    "callback_state": "delivered" if delivered else "failed",
                    "callback_error": clip_message(error or ""),
                },
            )
        pipe.srem(self._key("callbacks"), job_id)
        self._call(pipe.execute)

    def stats(self) -> StoreStats:
        unfinished = self._call(self._redis.smembers, self._key("unfinished"))
        pending = running = 0
        for job_id in unfinished:
            counts = self._call(
                self._redis.hmget, self._key("job", job_id), ["n_pending", "n_running"]
            )
            pending += int(counts[0] or 0)
            running += int(counts[1] or 0)
        spool = int(self._call(self._redis.get, self._key("spool_bytes")) or 0)
        return StoreStats(len(unfinished), pending, running, spool)

    def close(self) -> None:
        self._redis.close()


def _number(raw: Mapping[str, str], name: str) -> float | None:
    value = raw.get(name)
    return float(value) if value not in (None, "") else None


def _view(job_id: str, raw: Mapping[str, str]) -> JobView:
    counts = JobCounts(
        total=int(raw.get("total", 0)),
        pending=int(raw.get("n_pending", 0)),
        running=int(raw.get("n_running", 0)),
        done=int(raw.get("n_done", 0)),
        error=int(raw.get("n_error", 0)),
        skipped=int(raw.get("n_skipped", 0)),
    )
    return JobView(
        job_id=job_id,
        state=raw["state"],  # type: ignore[arg-type]
        created_at=float(raw["created_at"]),
        started_at=_number(raw, "started_at"),
        finished_at=_number(raw, "finished_at"),
        expires_at=float(raw["expires_at"]),
        options=json.loads(raw.get("options") or "{}"),
        callback_url=raw.get("callback_url") or None,
        callback_state=raw.get("callback_state") or None,
        error=raw.get("error") or None,
        counts=counts,
    )


def _item_result(index: int, meta: Mapping[str, Any], result: str | None) -> ItemResult:
    return ItemResult(
        index=index,
        source=meta["source"],
        state=meta["state"],
        result=json.loads(result) if result else None,
        error=meta.get("error") or None,
        attempts=int(meta.get("attempts", 0)),
    )
