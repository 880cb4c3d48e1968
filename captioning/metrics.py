"""The service's Prometheus metrics, one registry per runtime.

Operators need queue depth, batch sizes, latency, cache hit rate and model state without polling
`/health`. Events (a request answered, a batch run, a job leaving the queue) are recorded as
they happen by the HTTP hooks and the batcher's observer hooks; states (queue depth, model state,
cache counts, emoji-config source and age) are read from the runtime when Prometheus scrapes, by
a custom collector, so they can never go stale and nothing has to remember to update them.

Each :class:`ServiceMetrics` owns its own ``CollectorRegistry`` (never the process-wide default):
tests build many runtimes in one process, and a second service in a process must not count into
the first one's numbers. Label values stay bounded: route templates, a fixed set of methods, the
status code, fixed state names — never URLs, file names or request ids. A scrape reads counters
and attributes only; it never takes the model's lock or waits on the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from captioning.batcher import PRIORITIES
from captioning.model_state import FAILED, LOADED, LOADING

if TYPE_CHECKING:
    from captioning.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "blip2"
#: HTTP methods counted by name; anything else a client invents is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
#: The route label of requests no route matched (404, and 405 before routing).
UNMATCHED_ROUTE = "unmatched"
MODEL_STATES = (LOADING, LOADED, FAILED)
EMOJI_SOURCES = ("remote", "cache", "bundled")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 64, 128, 256)  # exact up to 8
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def method_label(method: str) -> str:
    """The method as a bounded label value."""
    upper = method.upper()
    return upper if upper in KNOWN_METHODS else "other"


class ServiceMetrics:
    """Every metric of one runtime, in one registry; the recording methods are thread-safe."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            f"{PREFIX}_http_request_duration_seconds",
            "Time from the request reaching Flask to its response being ready, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_http_requests_in_flight",
            "HTTP requests being handled right now (a scrape counts itself).",
            registry=reg,
        )
        self.batch_seconds = Histogram(
            f"{PREFIX}_model_batch_duration_seconds",
            "Model time of each batch the inference worker ran successfully.",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_model_batch_size",
            "Images in each batch the inference worker ran successfully.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=reg,
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Time each image waited in its queue (interactive or bulk) before its batch started.",
            ["priority"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=reg,
        )
        reg.register(RuntimeCollector(runtime))

    # -- recording (called by the HTTP hooks and the batcher's observer hooks) ---------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method_label(method), str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def observe_queue_wait(self, seconds: float, priority: str) -> None:
        label = priority if priority in PRIORITIES else "other"
        self.queue_wait.labels(label).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)


class RuntimeCollector(Collector):
    """States read from the runtime at scrape time: queue, model, drain, cache, emoji config."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Metric]:
        yield from self._queue()
        yield from self._model()
        yield from self._cache()
        yield from self._emoji()

    def _queue(self) -> Iterator[Metric]:
        batcher = self._runtime.model.batcher
        settings = self._runtime.settings
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Images waiting in the batch queue (not counting the batch being run).",
            value=batcher.depth if batcher is not None else 0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_capacity",
            "Queue bound (MAX_QUEUE); requests beyond it get 503 at once.",
            value=batcher.max_queue if batcher is not None else settings.max_queue,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_bulk_queue_depth",
            "Job items waiting in the bulk queue (served only when no interactive request waits).",
            value=batcher.bulk_depth if batcher is not None else 0,
        )
        if batcher is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_bulk_queue_capacity",
                "Bulk queue bound; when it is full the job worker waits for room.",
                value=batcher.max_bulk_queue,
            )
        yield GaugeMetricFamily(
            f"{PREFIX}_model_busy",
            "1 while the inference worker is running a batch, else 0.",
            value=1 if batcher is not None and batcher.busy else 0,
        )

    def _model(self) -> Iterator[Metric]:
        model = self._runtime.model
        state = GaugeMetricFamily(
            f"{PREFIX}_model_state",
            "1 for the model's current state (loading, loaded, error), 0 for the others.",
            labels=["state"],
        )
        for name in MODEL_STATES:
            state.add_metric([name], 1 if model.state == name else 0)
        yield state
        captioner = model.captioner
        if captioner is not None:
            about = captioner.describe()
            yield InfoMetricFamily(
                f"{PREFIX}_model",
                "The loaded model: name, family (arch), device, precision and decoder.",
                value={
                    "name": str(about["name"]),
                    "arch": str(about["arch"]),
                    "device": str(captioner.device),
                    "precision": str(about["precision"]),
                    "decode": str(about["decode"]),
                },
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_model_parameters",
                "Parameters of the loaded model.",
                value=about["parameters"],
            )
        if model.threads is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_model_threads",
                "Threads the model's CPU operations run on now: TORCH_THREADS, or else the "
                "start-up choice between one core and all of them, in fp32 less a thread for "
                "every core other processes held before the batch began (at least one).",
                value=model.threads,
            )
        by_threads = model.thread_batches
        if by_threads:
            batches = CounterMetricFamily(
                f"{PREFIX}_model_thread_batches",
                "Batches the model ran, by the threads they ran on (fp32 on a CPU with "
                "TORCH_THREADS unset: the count is chosen before each batch).",
                labels=["threads"],
            )
            for threads, count in by_threads.items():
                batches.add_metric([str(threads)], count)
            yield batches
        if model.load_seconds is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_model_load_seconds",
                "Seconds the model took to load and warm up.",
                value=model.load_seconds,
            )
        yield GaugeMetricFamily(
            f"{PREFIX}_draining",
            "1 once a stop signal arrived and the service is finishing accepted work.",
            value=1 if self._runtime.draining else 0,
        )

    def _cache(self) -> Iterator[Metric]:
        info = self._runtime.cache.health()
        for kind, meaning in (("hits", "found"), ("misses", "not found")):
            yield CounterMetricFamily(
                f"{PREFIX}_cache_{kind}",
                f"Result-cache lookups whose captions were {meaning} (0 with the cache off).",
                value=int(info.get(kind) or 0),
            )

    def _emoji(self) -> Iterator[Metric]:
        info = self._runtime.emoji.health()
        source = GaugeMetricFamily(
            f"{PREFIX}_emoji_config_source",
            "1 for where the emoji config in use came from (remote, cache, bundled); all 0 "
            "before it is loaded.",
            labels=["source"],
        )
        for name in EMOJI_SOURCES:
            source.add_metric([name], 1 if info.get("source") == name else 0)
        yield source
        age = info.get("age_seconds")
        if age is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_emoji_config_age_seconds",
                "Seconds since the emoji config in use was last fetched or confirmed current.",
                value=float(age),
            )
