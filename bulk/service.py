"""Bulk captioning's parts, built from Settings and owned by the runtime: what the batch and job
routes call.

    bulk = BulkService(settings, pipeline, images)
    bulk.open()      # the job store and spool (jobs can be submitted while the model loads)
    bulk.start()     # after the batcher: the job worker and the upkeep thread
    ...
    bulk.begin_drain()            # SIGTERM: the worker claims nothing more
    bulk.stop(drain_timeout)      # items in flight finish and are recorded, the rest released

Store errors become the domain errors of captioning/errors.py here, so the HTTP edge never
translates. Synchronous batches stage (read, decode) all their items concurrently on a small pool
of this service's, then hand them to the batcher together, so 16 images run as two full model
batches rather than trickling in one by one.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import re
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from bulk.callbacks import CallbackSender, check_callback_url
from bulk.inputs import BatchItem, BulkLimits, BulkRequest, job_items
from bulk.job_store import SqliteJobStore
from bulk.jobs import (
    MAX_PAGE,
    InvalidJob,
    ItemResult,
    JobStore,
    JobStoreConfig,
    JobStoreError,
    JobView,
    SpoolQuotaExceeded,
    StoreFull,
    StoreUnavailable,
    TooManyItems,
)
from bulk.jobs import TooManyJobs as StoreTooManyJobs
from bulk.spool import Spool
from bulk.upkeep import Upkeep
from bulk.worker import ItemRunner, JobWorker
from captioning.errors import (
    InsufficientStorage,
    InvalidRequest,
    LimitExceeded,
    NotFound,
    NotReady,
    Overloaded,
    ServiceError,
    TooManyJobs,
)
from captioning.pipeline import CaptionResult, Staged
from image_input.url_fetch import UrlFetcher

if TYPE_CHECKING:
    from captioning.options import GenerationOptions
    from captioning.pipeline import Pipeline
    from image_input.sources import ImageReader
    from settings import Settings

log = logging.getLogger(__name__)

SPOOL_DIRNAME = "spool"
T = TypeVar("T")


def _translated(exc: JobStoreError) -> ServiceError:
    """The domain error (and so the HTTP status) of a job store refusal."""
    kinds: tuple[tuple[type[JobStoreError], type[ServiceError]], ...] = (
        (InvalidJob, InvalidRequest),
        (TooManyItems, LimitExceeded),
        (StoreTooManyJobs, TooManyJobs),
        (SpoolQuotaExceeded, InsufficientStorage),
        (StoreFull, InsufficientStorage),
        (StoreUnavailable, Overloaded),
    )
    for store_kind, domain in kinds:
        if isinstance(exc, store_kind):
            return domain(exc.message)
    return Overloaded("the job store is unavailable; try again later")


def _guarded(step: Callable[..., T], *args: Any, **kwargs: Any) -> T | str:
    """A pipeline step's value, or its client-safe error message."""
    try:
        return step(*args, **kwargs)
    except ServiceError as exc:
        return exc.message
    except Exception:
        log.exception("batch item failed unexpectedly")
        return "internal error while captioning this image"


def open_job_store(settings: Settings, config: JobStoreConfig) -> JobStore:
    """Redis (shared by every replica: any replica answers any job, items spread over all) when
    REDIS_URL is set, else the embedded SQLite file JOBS_DB."""
    if settings.redis_url:
        from bulk.redis_job_store import RedisJobStore

        return RedisJobStore(settings.redis_url, config)
    return SqliteJobStore(settings.jobs_db_path, config)


def bulk_batch(settings: Settings) -> int:
    """Job items in flight at once, and so the size of a bulk model batch: half of
    MAX_BATCH_SIZE, so an interactive request that arrives while a job's batch runs waits for
    a short batch only (the fairness benchmark's ratio; docs/performance.md)."""
    return max(1, settings.max_batch_size // 2)


class BulkService:
    """The batch pool, the job store, spool, worker and upkeep, and their lifecycles."""

    def __init__(self, settings: Settings, pipeline: Pipeline, images: ImageReader) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.images = images
        self.batch_limits = BulkLimits(
            settings.max_batch_items, settings.max_batch_bytes, settings.max_file_size
        )
        self.job_limits = BulkLimits(
            settings.max_job_items, settings.max_job_bytes, settings.max_file_size
        )
        self.worker_id = f"{socket.gethostname()}:{settings.port}"
        self.store: JobStore | None = None
        self.spool: Spool | None = None
        self.worker: JobWorker | None = None
        self.upkeep: Upkeep | None = None
        self.unavailable = ""  # why jobs cannot be used (the store failed to open)
        # Threads start on first use only.
        self._archive_fetcher = UrlFetcher(
            max_bytes=settings.max_batch_bytes,
            timeout=settings.timeout,
            allow_private=settings.allow_private_urls,
        )
        self._batch_pool = cf.ThreadPoolExecutor(
            max(2 * settings.max_batch_size, 16), thread_name_prefix="batch-item"
        )
        self._sender = CallbackSender(
            timeout=settings.timeout, allow_private=settings.allow_private_urls
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the job store and the spool; on failure jobs answer 503 with the reason."""
        settings = self.settings
        config = JobStoreConfig(
            ttl_seconds=settings.jobs_ttl,
            claim_timeout=settings.job_claim_timeout,
            max_unfinished_jobs=settings.max_jobs,
            max_items_per_job=settings.max_job_items,
            max_spool_bytes=settings.jobs_disk_quota,
        )
        try:
            store = open_job_store(settings, config)
        except JobStoreError as exc:
            log.error("jobs unavailable: %s", exc.message)
            self.unavailable = "the job store could not be opened"
            return
        self.store = store
        self.spool = Spool(
            settings.jobs_dir / SPOOL_DIRNAME,
            quota=settings.jobs_disk_quota,
            used=lambda: store.stats().spool_bytes,
        )

    def start(self) -> BulkService:
        """Start the job worker and the upkeep thread (the batcher must be running)."""
        if self.store is None or self.spool is None:
            return self
        settings = self.settings
        runner = ItemRunner(
            self.store,
            self.pipeline,
            self.images,
            self.spool,
            item_timeout=max(settings.request_timeout, 60.0),
            give_up_after=settings.job_claim_timeout / 2,
        )
        self.worker = JobWorker(
            self.store, runner, worker_id=self.worker_id, capacity=bulk_batch(settings)
        ).start()
        self.upkeep = Upkeep(
            self.store,
            self.spool,
            self._sender,
            attempts=settings.job_callback_attempts,
            backoff=settings.job_callback_backoff,
            expire_interval=min(max(settings.jobs_ttl / 4, 0.25), 30.0),
        ).start()
        return self

    def begin_drain(self) -> None:
        if self.worker is not None:
            self.worker.stop_claiming()

    def stop(self, timeout: float) -> bool:
        """Stop the worker (items in flight finish within `timeout` s), upkeep, pools, store.
        True when every claimed item was finished and recorded."""
        finished = True
        if self.worker is not None:
            finished = self.worker.stop(timeout)
        if self.upkeep is not None:
            self.upkeep.stop()
        self._batch_pool.shutdown(wait=False, cancel_futures=True)
        self._archive_fetcher.close()
        self._sender.close()
        if self.store is not None:
            self.store.close()
        return finished

    # -- batches ---------------------------------------------------------------------------------

    def fetch_archive(self, url: str) -> bytes:
        """A zip archive named by `url=`, within MAX_BATCH_BYTES and TIMEOUT (SSRF-safe)."""
        return self._archive_fetcher.fetch(url)

    def caption_batch(
        self,
        items: Sequence[BatchItem],
        options: GenerationOptions,
        *,
        tags: bool,
        deadline: float,
    ) -> list[dict[str, Any]]:
        """One result per item, in order: ``{index, source, status, predictions | error}``."""
        pool = self._batch_pool
        staging = [
            pool.submit(_guarded, self.pipeline.stage, item.image, options, deadline=deadline)
            if item.image is not None
            else None
            for item in items
        ]
        staged = [
            future.result() if future is not None else item.error or "unreadable"
            for item, future in zip(items, staging, strict=True)
        ]
        finishing = [
            pool.submit(_guarded, self.pipeline.finish, s, options, deadline=deadline, tags=tags)
            if isinstance(s, Staged)
            else s
            for s in staged
        ]
        results = []
        for index, (item, outcome) in enumerate(zip(items, finishing, strict=True)):
            entry: dict[str, Any] = {"index": index, "source": item.source}
            done = outcome.result() if isinstance(outcome, cf.Future) else outcome
            if isinstance(done, CaptionResult):
                entry.update(status="success", predictions=done.predictions)
            else:
                entry.update(status="error", error=done)
            results.append(entry)
        return results

    # -- jobs ------------------------------------------------------------------------------------

    def _jobs(self) -> tuple[JobStore, Spool]:
        if self.store is None or self.spool is None:
            if self.unavailable:
                raise NotReady("error", f"Jobs are unavailable: {self.unavailable}")
            raise NotReady("loading", "Model is loading")
        return self.store, self.spool

    def check_callback(self, url: str) -> str:
        return check_callback_url(
            url, allow_private=self.settings.allow_private_urls, timeout=self.settings.timeout
        )

    def create_job(
        self,
        request: BulkRequest,
        options: GenerationOptions,
        *,
        tags: bool,
        callback_url: str | None,
    ) -> JobView:
        """Spool the request's uploads, store the job; its status (state ``queued``)."""
        store, spool = self._jobs()
        public = {**options.as_public(), "tags": tags}
        spool_dir = spool.open()
        try:
            items = job_items(request, self.job_limits, spool_dir, self.fetch_archive)
            job_id = store.create_job(
                items,
                public,
                callback_url=callback_url,
                spool_dir=spool_dir.name,
                spool_bytes=spool_dir.bytes,
            )
        except JobStoreError as exc:
            spool_dir.discard()
            raise _translated(exc) from None
        except BaseException:
            spool_dir.discard()
            raise
        spool_dir.commit()
        if self.worker is not None:
            self.worker.wake()
        return self.job(job_id)

    def job(self, job_id: str) -> JobView:
        store, _ = self._jobs()
        try:
            view = store.get(job_id)
        except JobStoreError as exc:
            raise _translated(exc) from None
        if view is None:
            raise _no_job(job_id)
        return view

    def results(self, job_id: str, offset: int, limit: int) -> list[ItemResult]:
        store, _ = self._jobs()
        try:
            page = store.results(job_id, offset, min(limit, MAX_PAGE))
        except JobStoreError as exc:
            raise _translated(exc) from None
        if page is None:
            raise _no_job(job_id)
        return page

    def iter_results(self, job_id: str) -> Iterator[ItemResult]:
        """Every item in order, page by page; NotFound is raised before the first item."""
        store, _ = self._jobs()
        self.job(job_id)
        return store.iter_results(job_id)

    def cancel(self, job_id: str) -> JobView:
        store, _ = self._jobs()
        try:
            view = store.cancel(job_id)
        except JobStoreError as exc:
            raise _translated(exc) from None
        if view is None:
            raise _no_job(job_id)
        return view

    def callback_state(self, view: JobView) -> Mapping[str, Any] | None:
        if view.callback_url is None:
            return None
        return {"url": view.callback_url, "state": view.callback_state}


_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what `secrets.token_urlsafe` makes


def _no_job(job_id: str) -> NotFound:
    """The 404 of an unknown job; an id no store could have made is not echoed back."""
    shown = f"'{job_id}'" if _JOB_ID.fullmatch(job_id) else "with that id"
    return NotFound(f"No job {shown} (it may have expired)")
