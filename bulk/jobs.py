"""What an asynchronous job is, and the `JobStore` protocol every job store implements.

Kept apart from the stores so the worker and the HTTP edge depend on this small vocabulary
only: the embedded SQLite store (`bulk.job_store`) and a Redis store for replicas (issue 10)
are interchangeable behind :class:`JobStore`.

The protocol is shaped so that Redis Streams fit it without translation: an item is addressed by
``(job_id, index)`` (an :class:`ItemRef`, carried in each stream message); ``claim`` is
``XREADGROUP`` with ``XAUTOCLAIM`` of items idle longer than the claim timeout; ``record`` is
"set the result if none yet" (``HSETNX`` or a short Lua script) followed by ``XACK``;
``release_claims(worker_id)`` is ``XCLAIM`` of a consumer's pending entries back to the group;
``expire`` walks a sorted set of expiry times. Nothing here assumes a single process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ItemState = Literal["pending", "claimed", "done", "error", "skipped"]

JOB_STATES: tuple[JobState, ...] = ("queued", "running", "done", "failed", "cancelled")
ITEM_STATES: tuple[ItemState, ...] = ("pending", "claimed", "done", "error", "skipped")
FINISHED_JOB_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
#: How an item's state reads to a client (``status`` in a result line).
ITEM_STATUS: Mapping[str, str] = {
    "pending": "pending",
    "claimed": "running",
    "done": "success",
    "error": "error",
    "skipped": "skipped",
}
MAX_SOURCE_CHARS = 2048
MAX_REF_CHARS = 4096
MAX_MESSAGE_CHARS = 1000
MAX_PAGE = 1000  # results per page, at most


class JobStoreError(Exception):
    """A job request the store refuses; `message` is safe to show to a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidJob(JobStoreError):
    """The job itself is malformed: no items, options that are not JSON (HTTP 400)."""


class TooManyItems(JobStoreError):
    """More items than one job may have (HTTP 413)."""


class TooManyJobs(JobStoreError):
    """Too many unfinished jobs already; retry once some finish (HTTP 429 + Retry-After)."""


class SpoolQuotaExceeded(JobStoreError):
    """The job's spooled uploads would exceed the disk quota (HTTP 507)."""


class StoreFull(JobStoreError):
    """The store holds as many items as it may, counting kept finished jobs (HTTP 507)."""


class StoreUnavailable(JobStoreError):
    """The store cannot be written now (locked too long, disk full, I/O error) (HTTP 503)."""


@dataclass(frozen=True)
class JobStoreConfig:
    """Bounds and timings shared by every store implementation."""

    ttl_seconds: float = 24 * 3600  # how long a job is kept after it finishes
    claim_timeout: float = 300.0  # a claim older than this is presumed dead and released
    max_attempts: int = 3  # claims of one item before it is given up as an error
    max_unfinished_jobs: int = 16  # queued + running jobs at once
    max_items_per_job: int = 10_000
    max_stored_items: int = 1_000_000  # items of all kept jobs, finished ones included
    max_spool_bytes: int | None = None  # declared spool bytes of all kept jobs; None = no quota
    max_result_bytes: int = 64 * 1024  # one item's result, as JSON


class ItemRef(NamedTuple):
    """The address of one item: its job and its position in the job (0-based)."""

    job_id: str
    index: int


@dataclass(frozen=True)
class NewItem:
    """One input of a job being created."""

    source: str  # what the client sees: a file name, a URL, "archive.zip: photos/a.jpg"
    input_ref: str  # what the worker reads: a spooled file path or a URL


@dataclass(frozen=True)
class ClaimedItem:
    """An item handed to one worker, with what it needs to run it."""

    ref: ItemRef
    source: str
    input_ref: str
    options: dict[str, Any]  # the job's options, as given to create_job
    attempts: int  # 1 on the first claim


@dataclass(frozen=True)
class Outcome:
    """The end of one item: a result (JSON-able mapping) or a client-safe error message."""

    ref: ItemRef
    result: Mapping[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class JobCounts:
    total: int = 0
    pending: int = 0
    running: int = 0  # claimed by a worker now
    done: int = 0
    error: int = 0
    skipped: int = 0  # never run: the job was cancelled or failed first

    @property
    def finished(self) -> int:
        return self.done + self.error

    def to_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "pending": self.pending,
            "running": self.running,
            "done": self.done,
            "error": self.error,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class JobView:
    """A job's status at one moment. Timestamps are Unix seconds."""

    job_id: str
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float
    options: dict[str, Any]
    callback_url: str | None
    callback_state: str | None  # None without a callback; pending, delivered or failed
    error: str | None  # why the job failed (state "failed"), else None
    counts: JobCounts = field(default_factory=JobCounts)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_JOB_STATES

    @property
    def progress(self) -> float:
        """Finished items (results or errors) over all items, 0.0 to 1.0."""
        return self.counts.finished / self.counts.total if self.counts.total else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "created_at": iso_time(self.created_at),
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at),
            "expires_at": iso_time(self.expires_at),
            "counts": self.counts.to_dict(),
            "progress": round(self.progress, 4),
            "error": self.error,
            "options": self.options,
        }


@dataclass(frozen=True)
class ItemResult:
    """One item as a client reads it."""

    index: int
    source: str
    state: ItemState
    result: dict[str, Any] | None
    error: str | None
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        """``{index, source, status, **result}`` or ``{index, source, status, error}``."""
        line: dict[str, Any] = {
            "index": self.index,
            "source": self.source,
            "status": ITEM_STATUS[self.state],
        }
        if self.result is not None:
            for key, value in self.result.items():
                line.setdefault(key, value)  # the item's own fields cannot be overwritten
        if self.error is not None:
            line["error"] = self.error
        return line


@dataclass(frozen=True)
class ExpiredJob:
    """A job `expire` removed; its spool directory (if any) is the caller's to delete."""

    job_id: str
    spool_dir: str | None


@dataclass(frozen=True)
class StoreStats:
    unfinished_jobs: int
    pending_items: int
    running_items: int
    spool_bytes: int


def check_new_job(
    config: JobStoreConfig, items: Sequence[NewItem], callback_url: str | None
) -> None:
    """The checks every store makes before creating a job (the room checks are its own)."""
    if not items:
        raise InvalidJob("a job needs at least one item")
    if len(items) > config.max_items_per_job:
        raise TooManyItems(
            f"a job may have at most {config.max_items_per_job} items, got {len(items)}"
        )
    for item in items:
        if len(item.source) > MAX_SOURCE_CHARS or len(item.input_ref) > MAX_REF_CHARS:
            raise InvalidJob("an item's name or address is too long")
    if callback_url is not None and len(callback_url) > MAX_REF_CHARS:
        raise InvalidJob("callback_url is too long")


def to_json(value: dict[str, Any], what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidJob(f"{what} must be JSON") from None


def clip_message(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def stored_outcome(config: JobStoreConfig, outcome: Outcome) -> tuple[str, str | None, str | None]:
    """(item state, result JSON, error) for an outcome, within the result size bound."""
    if outcome.result is None:
        return "error", None, clip_message(outcome.error or "failed")
    try:
        text = to_json(dict(outcome.result), "result")
    except InvalidJob:
        log.error("item %s: result is not JSON-serialisable", outcome.ref)
        return "error", None, "internal error: the result could not be stored"
    if len(text.encode()) > config.max_result_bytes:
        log.warning("item %s: result of %d bytes is over the bound", outcome.ref, len(text))
        return "error", None, "the result is too large to store"
    return "done", text, None


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


@runtime_checkable
class JobStore(Protocol):
    """Durable jobs: create, hand out items to workers, record outcomes, read, cancel, expire.

    Guarantees every implementation gives: an item is handed to one worker at a time while its
    claim is live; the first recorded outcome of an item wins and later ones are ignored, so no
    item is ever counted or stored twice; a claim that outlives ``claim_timeout`` (or is
    released) goes back to pending, so a crashed worker's items run again elsewhere.
    """

    config: JobStoreConfig

    def create_job(
        self,
        items: Sequence[NewItem],
        options: Mapping[str, Any],
        *,
        callback_url: str | None = None,
        spool_dir: str | None = None,
        spool_bytes: int = 0,
    ) -> str:
        """Store a queued job; its id (URL-safe, unguessable). Raises a JobStoreError subclass."""
        ...

    def claim(self, worker_id: str, limit: int) -> list[ClaimedItem]:
        """Up to `limit` pending items, oldest job first, in item order; marks the jobs running."""
        ...

    def record(self, outcomes: Sequence[Outcome]) -> int:
        """Store outcomes in one step (first wins); how many were new. Finishes done jobs."""
        ...

    def complete(self, ref: ItemRef, result: Mapping[str, Any]) -> bool:
        """Store one result; False if the item already had an outcome (or no longer exists)."""
        ...

    def fail_item(self, ref: ItemRef, message: str) -> bool:
        """Store one item error; False if the item already had an outcome."""
        ...

    def release_claims(self, worker_id: str | None = None) -> int:
        """Put one worker's (or, with None, every) claimed items back; how many."""
        ...

    def release_stale(self, now: float | None = None) -> int:
        """Put claims older than ``claim_timeout`` back (``claim`` also does this); how many."""
        ...

    def cancel(self, job_id: str) -> JobView | None:
        """Cancel an unfinished job (pending items are skipped); None if there is no such job."""
        ...

    def fail_job(self, job_id: str, message: str) -> JobView | None:
        """End an unfinished job as failed with a client-safe reason; pending items skipped."""
        ...

    def get(self, job_id: str) -> JobView | None: ...

    def results(self, job_id: str, offset: int = 0, limit: int = 100) -> list[ItemResult] | None:
        """Items ``offset`` .. ``offset + limit - 1`` in item order (`limit` at most
        :data:`MAX_PAGE`); None if no such job."""
        ...

    def iter_results(self, job_id: str, page_size: int = 500) -> Iterator[ItemResult]:
        """Every item in order, read page by page (never the whole job in memory)."""
        ...

    def expire(self, now: float | None = None) -> list[ExpiredJob]:
        """Remove jobs past their expiry time; the caller deletes their spool directories."""
        ...

    def pending_callbacks(self, limit: int = 10) -> list[JobView]:
        """Finished jobs whose callback has not been delivered or given up yet."""
        ...

    def callback_done(self, job_id: str, delivered: bool, error: str | None = None) -> None:
        """Record the end of a job's callback attempts (delivered, or failed for good)."""
        ...

    def stats(self) -> StoreStats: ...

    def close(self) -> None: ...
