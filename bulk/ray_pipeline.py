"""`caption --ray`: the folder CLI on Ray Data, for collections bigger than one machine.

    inputs (files, @lists, a Parquet column)          one row per image: kind, name
      → map_batches(CaptionActor), actor pool         read → SHA-256 → decode → prepare → model
      → driver: predictions (emoji, tags) → the CLI's sink, progress bar and summary

Ray Data's batch-inference shape (a model class per actor): each :class:`CaptionActor` loads one
Captioner in ``__init__`` and captions a whole batch per ``__call__`` with
``caption_prepared``; on a cluster with GPUs there is one actor per GPU (``--num-gpus`` per
actor, ``--actors`` to choose). Images are read and decoded inside the actors with the service's
own safe input (``ImageReader``: ``read_file`` and the SSRF-guarded ``UrlFetcher`` with the
MAX_FILE_SIZE and TIMEOUT limits; ``decode_image`` with MAX_IMAGE_PIXELS), a few at a time in
threads, so only names go into the object store and only captions come out of it. The emoji
mappings and tags are made in the driver from one config, and the rows go through the same
sink as the in-process CLI, so the output and resuming are the same (the actors are handed the
``done`` map and skip what is already there).

Ray is imported only here, and this module only with ``--ray``: the service never needs it.
Without ``--ray-address`` (or RAY_ADDRESS) an embedded Ray is started on this machine, bound to
127.0.0.1, without a dashboard or usage reporting, with a small object store and its own
temporary folder (under TMPDIR), and stopped and removed at the end.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bulk.cli_inputs import Input, entry, parquet_count
from bulk.cli_progress import EngineError, Outcome
from captioning.errors import ServiceError

if TYPE_CHECKING:
    import pyarrow as pa

    from captioning.options import GenerationOptions
    from emoji_config import EmojiConfigStore
    from settings import Settings

log = logging.getLogger(__name__)

#: For the embedded Ray only, set before Ray is imported: Ray then takes 127.0.0.1 as the
#: node's address (its servers listen on loopback only) and sends no usage statistics.
EMBEDDED_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
#: Threads per actor that read and decode the images of a batch while others wait on I/O.
DECODE_THREADS = 4
#: How long the actor pool may take to start (model loading included) before the run fails.
ACTOR_START_TIMEOUT_S = 600
#: Embedded Ray: how long the finished actors get to exit before Ray itself is stopped (stopped
#: first, they linger for seconds at full CPU trying to reach it).
ACTOR_EXIT_WAIT_S = 10.0
_MB = 1024 * 1024


# --------------------------------------------------------------------------- actor side


def absolute_paths(settings: Settings) -> Settings:
    """The settings with every relative path resolved against the driver's working directory.

    Ray starts actors in a working directory of its own, so `MODEL_CONFIG=models/tiny-shapes/…`
    (as the README writes it) would name a file that is not there. The driver resolves them.
    """
    changes = {
        f.name: value.resolve()
        for f in fields(settings)
        if isinstance(value := getattr(settings, f.name), Path) and not value.is_absolute()
    }
    return settings.with_overrides(**changes) if changes else settings


@dataclass
class _Staged:
    status: str  # "ready", "skipped", "failed"
    sha256: str = ""
    prepared: Any = None
    error: str = ""


class CaptionActor:
    """One Captioner per Ray actor; ``__call__`` captions a batch of named images."""

    def __init__(
        self, settings: Settings, options: GenerationOptions, done: dict[str, str]
    ) -> None:
        from blip2_model import Captioner
        from image_input.sources import ImageReader

        self.captioner = Captioner.load(settings)
        self.captioner.check_options(options)  # unfit options fail the run, not every batch
        self.images = ImageReader(settings)
        self.max_pixels = settings.max_image_pixels
        self.options = options
        self.done = done
        self.pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        names = batch.column("name").to_pylist()
        staged = list(self.pool.map(self._stage, kinds, names))
        ready = [s for s in staged if s.status == "ready"]
        captions: dict[int, list[str]] = {}
        try:
            made = self.captioner.caption_prepared([s.prepared for s in ready], self.options)
            captions = {id(s): caps for s, caps in zip(ready, made, strict=True)}
        except Exception as exc:  # e.g. CUDA out of memory: this batch fails, the run goes on
            log.exception("batch of %d failed", len(ready))
            for s in ready:
                s.status, s.error = "failed", f"model failed: {type(exc).__name__}: {exc}"
        return _table(kinds, names, staged, captions)

    def _stage(self, kind: str, name: str) -> _Staged:
        """Read, hash, look up, decode and prepare one image; never raises."""
        from image_input.decode import decode_image

        known = self.done.get(name)
        if kind == "url" and known is not None:
            return _Staged("skipped", known)  # not downloaded again (see bulk/cli_output.py)
        source = self.images.file(name) if kind == "file" else self.images.url(name)
        try:
            data = source.read()
            sha256 = hashlib.sha256(data).hexdigest()
            if sha256 == known:
                return _Staged("skipped", sha256)
            image = decode_image(data, max_pixels=self.max_pixels, error_prefix=source.error_prefix)
            return _Staged("ready", sha256, self.captioner.prepare(image))
        except ServiceError as exc:
            return _Staged("failed", error=exc.message)
        except Exception as exc:  # an unforeseen library error: this image fails, not the run
            return _Staged("failed", error=f"{type(exc).__name__}: {exc}")


def _table(
    kinds: list[str], names: list[str], staged: list[_Staged], captions: dict[int, list[str]]
) -> pa.Table:
    import pyarrow as pa

    return pa.table(
        {
            "kind": pa.array(kinds, pa.string()),
            "name": pa.array(names, pa.string()),
            "status": pa.array(
                ["captioned" if s.status == "ready" else s.status for s in staged], pa.string()
            ),
            "sha256": pa.array([s.sha256 for s in staged], pa.string()),
            "captions": pa.array([captions.get(id(s), []) for s in staged], pa.list_(pa.string())),
            "error": pa.array([s.error for s in staged], pa.string()),
            "worker": pa.array([os.getpid()] * len(staged), pa.int64()),
        }
    )


def parquet_entries(batch: pa.Table, column: str, base: str) -> pa.Table:
    """A Parquet column of paths or URLs → rows of (kind, name); empty cells dropped."""
    import pyarrow as pa

    items = [
        entry(value.strip(), Path(base))
        for value in batch.column(column).to_pylist()
        if isinstance(value, str) and value.strip()
    ]
    return pa.table(
        {
            "kind": pa.array([i.kind for i in items], pa.string()),
            "name": pa.array([i.name for i in items], pa.string()),
        }
    )


# --------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class ActorPlan:
    """How many Captioner actors, and what each one reserves."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def plan_actors(
    cluster_cpus: float,
    cluster_gpus: float,
    *,
    actors: int | None,
    num_gpus: float | None,
    reserved_cpus: float = 0.0,
) -> ActorPlan:
    """One actor per GPU by default (1 on a CPU-only cluster); CPUs shared out among them."""
    gpus = num_gpus if num_gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus > 0 else 1
    usable = max(cluster_cpus - reserved_cpus, 0.25)
    cpus = usable / actors if gpus == 0 else min(1.0, usable / actors)
    return ActorPlan(actors, gpus, max(round(cpus, 2), 0.01))


class RayRunner:
    """The folder CLI's engine on Ray Data (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        options: GenerationOptions,
        *,
        tags: bool,
        address: str | None = None,
        actors: int | None = None,
        num_gpus: float | None = None,
        object_store_mb: int = 256,
        parquet: tuple[Path, str] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.tags = tags
        self.address = address
        self.wanted_actors = actors
        self.wanted_gpus = num_gpus
        self.object_store_mb = object_store_mb
        self.parquet = parquet
        self.plan: ActorPlan | None = None
        self.emoji: EmojiConfigStore | None = None
        self._ray: Any = None
        self._temp_dir: Path | None = None
        self._actor_pids: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or join) Ray and load the emoji config; the actors load the model."""
        from emoji_config import EmojiConfigStore

        ray = self._init_ray()
        resources = ray.cluster_resources()
        self.plan = plan_actors(
            resources.get("CPU", 1.0),
            resources.get("GPU", 0.0),
            actors=self.wanted_actors,
            num_gpus=self.wanted_gpus,
            reserved_cpus=1.0 if self.parquet else 0.0,  # for the tasks that read the Parquet
        )
        log.info("ray: %s on %s", self.plan, resources)
        self.emoji = EmojiConfigStore(self.settings)
        self.emoji.load()

    def _init_ray(self) -> Any:
        embedded = not self.address
        if embedded:
            for name, value in EMBEDDED_ENV.items():
                os.environ.setdefault(name, value)  # read by Ray at import and by its workers
        try:
            import ray
            import ray.data
        except ImportError as exc:
            raise EngineError(f"--ray needs the ray dependency group: {exc}") from None
        verbose = logging.getLogger().isEnabledFor(logging.INFO)
        level = logging.INFO if verbose else logging.ERROR
        try:
            if embedded:
                # Sessions, logs and sockets in a folder of our own, removed by stop().
                self._temp_dir = Path(tempfile.mkdtemp(prefix="caption-ray-"))
                ray.init(
                    address="local",
                    num_cpus=(os.cpu_count() or 1) + (1 if self.parquet else 0),
                    include_dashboard=False,
                    object_store_memory=self.object_store_mb * _MB,
                    log_to_driver=verbose,
                    logging_level=level,
                    _temp_dir=str(self._temp_dir),
                )
            else:
                ray.init(address=self.address, log_to_driver=verbose, logging_level=level)
        except Exception as exc:  # cannot connect, cannot start (ports, /dev/shm, ...)
            where = "an embedded Ray" if embedded else f"Ray at {self.address}"
            raise EngineError(f"cannot start {where}: {type(exc).__name__}: {exc}") from None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI shows its own bar
        context.print_on_execution_start = False
        # Start work only when every actor has loaded its model (all share the first batches;
        # a cluster without room for the pool fails with a clear timeout instead of waiting).
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        logging.getLogger("ray.data").setLevel(level)
        self._ray = ray
        return ray

    def stop(self) -> None:
        if self.emoji is not None:
            self.emoji.close()
        if self._ray is not None:
            if self._temp_dir is not None:  # embedded: the actors are processes of this machine
                _wait_for_exit(self._actor_pids, ACTOR_EXIT_WAIT_S)
            self._ray.shutdown()
            self._ray = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # -- work --------------------------------------------------------------------------------

    def _parquet_dataset(self) -> Any:
        assert self.parquet is not None
        path, column = self.parquet
        return self._ray.data.read_parquet(str(path), columns=[column]).map_batches(
            parquet_entries,
            fn_kwargs={"column": column, "base": str(path.resolve().parent)},
            batch_format="pyarrow",
        )

    def count(self, inputs: list[Input]) -> int:
        """Inputs in all; the Parquet column is counted here (one column, read row group by
        row group) rather than by running the Ray pipeline twice. Checks the column exists."""
        return len(inputs) + (parquet_count(*self.parquet) if self.parquet else 0)

    def _dataset(self, inputs: list[Input]) -> Any:
        rows = [{"kind": item.kind, "name": item.name} for item in inputs]
        parts = []
        if rows:
            blocks = max(1, math.ceil(len(rows) / self.settings.max_batch_size))
            parts.append(self._ray.data.from_items(rows, override_num_blocks=min(blocks, 1000)))
        if self.parquet:
            parts.append(self._parquet_dataset())
        if not parts:
            return None
        return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    def outcomes(self, inputs: Iterable[Input], done: dict[str, str]) -> Iterator[Outcome]:
        """Caption on the actor pool; one outcome per input as batches come back."""
        assert self.plan is not None, "start() first"
        dataset = self._dataset(list(inputs))
        if dataset is None:
            return
        settings = absolute_paths(self.settings)
        if self.plan.gpus_per_actor == 0:
            settings = settings.with_overrides(device="cpu")  # never a GPU Ray did not grant
        captioned = dataset.map_batches(
            CaptionActor,
            fn_constructor_kwargs={"settings": settings, "options": self.options, "done": done},
            batch_size=self.settings.max_batch_size,
            batch_format="pyarrow",
            compute=self._ray.data.ActorPoolStrategy(size=self.plan.actors),
            num_gpus=self.plan.gpus_per_actor or None,
            num_cpus=self.plan.cpus_per_actor,
        )
        workers: set[int] = set()
        try:
            for batch in captioned.iter_batches(batch_size=None, batch_format="pyarrow"):
                for row in batch.to_pylist():
                    workers.add(row["worker"])
                    yield self._outcome(row)
        except self._ray.exceptions.RayError as exc:  # an actor could not start or died
            raise EngineError(f"Ray pipeline failed: {_first_line(exc)}") from None
        log.info("ray: %d actor processes took part", len(workers))
        self._actor_pids = workers

    def _outcome(self, row: dict[str, Any]) -> Outcome:
        from captioning.predictions import predictions

        assert self.emoji is not None
        item = Input(row["kind"], row["name"])
        if row["status"] != "captioned":
            return Outcome(item, row["status"], row["sha256"], error=row["error"])
        return Outcome(
            item,
            "captioned",
            row["sha256"],
            predictions(row["captions"], self.emoji.mapper, tags=self.tags),
        )


def _first_line(exc: BaseException) -> str:
    """Ray's errors carry whole remote tracebacks; the last line names the cause."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def _wait_for_exit(pids: set[int], timeout: float) -> None:
    """Wait until these local processes are gone (or `timeout` passed); never signals them."""
    started = time.monotonic()
    left = set(pids)
    while left and time.monotonic() < started + timeout:
        left = {pid for pid in left if _alive(pid)}
        if left:
            time.sleep(0.1)
    log.info("ray: actors exited after %.1f s (%d still running)", time.monotonic() - started,
             len(left))  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:  # gone (or no /proc: nothing to wait for)
        return False
