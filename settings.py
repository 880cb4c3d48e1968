"""One typed settings object, read once from the environment and `.env`.

No other module reads ``os.environ``: ``REST.py`` builds a :class:`Settings` at start-up and
passes it (or the parts each piece needs) down. Every variable is documented in `.env.example`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG_BASE = (
    "https://raw.githubusercontent.com/ice9innovations/animal-farm/refs/heads/main/config/"
)
# Where `python blip2_model.py download` fetches the real model files from.
DEFAULT_CHECKPOINT_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
    "model_large_caption.pth"
)
DEFAULT_TOKENIZER_URL = "https://huggingface.co/bert-base-uncased/resolve/main/"
DEFAULT_HUB_URL = "https://huggingface.co"
DEFAULT_BLIP2_CHECKPOINT_BASE_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
#: waitress threads kept free of captioning work so /health and /metrics always answer.
HEALTH_RESERVE_THREADS = 4


class SettingsError(ValueError):
    """A configuration value is malformed; the message names the variable."""


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}")


def _parse_int(name: str, raw: str, low: int | None = None, high: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _parse_float(name: str, raw: str, low: float = 0.0) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if value < low or value != value:  # NaN check
        raise SettingsError(f"{name} must be >= {low}, got {raw!r}")
    return value


def _parse_paths(raw: str) -> tuple[Path, ...]:
    """A list of directories separated by ``os.pathsep`` or commas."""
    parts = [p.strip() for chunk in raw.split(",") for p in chunk.split(os.pathsep)]
    return tuple(Path(p).expanduser().resolve() for p in parts if p)


def _optional_path(raw: str) -> Path | None:
    raw = raw.strip()
    return Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class Settings:
    """Every knob of the service, with the reference's defaults."""

    # HTTP server
    host: str = "0.0.0.0"
    port: int = 7777
    private: bool = False
    threads: int = 0  # 0: sized for the queue (see server_threads)
    drain_timeout: float = 30.0
    log_level: str = "INFO"
    log_format: str = "plain"
    cors_origins: str = "*"
    # Input limits
    max_file_size: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_private_urls: bool = True
    file_roots: tuple[Path, ...] | None = None
    max_downloads: int = 16
    decode_concurrency: int = 0  # 0: one per CPU core
    # Model
    model_name: str = "blip_caption"
    model_type: str = "large_coco"
    model_dir: Path = PROJECT_ROOT / "models"
    model_config: Path | None = None
    device: str | None = None
    precision: str = "fp32"
    decode: str = "fast"
    torch_threads: int | None = None
    # libgomp's idle policy, set before torch loads (openmp_policy.py): passive threads sleep
    # instead of spinning on cores that the inference thread or a neighbour needs.
    omp_wait_policy: str = "passive"
    # Rounds an idle OpenMP thread spins before it sleeps; None: 10,000 (~0.1 ms) with passive,
    # libgomp's own with active
    omp_spin_count: int | None = None
    checkpoint_url: str = DEFAULT_CHECKPOINT_URL
    tokenizer_url: str = DEFAULT_TOKENIZER_URL
    # BLIP-2: the language model's files (HF_ENDPOINT/<hub id>/resolve/main/...) and the caption
    # checkpoint (BLIP2_CHECKPOINT_BASE_URL/blip2_caption_opt2.7b.pth ...)
    hub_url: str = DEFAULT_HUB_URL
    blip2_checkpoint_base_url: str = DEFAULT_BLIP2_CHECKPOINT_BASE_URL
    model_download: bool = True
    # Inference worker
    max_batch_size: int = 8
    batch_wait_ms: int = 10
    max_queue: int = 64
    request_timeout: float = 60.0
    # Refuse an analyze request on its headers, before its body is read (http_api/door.py);
    # a place taken there is lent to a newer request once its body is DOOR_HOLD s late.
    shed_at_door: bool = True
    door_hold: float = 10.0
    # Result cache
    cache_size: int = 1024
    cache_ttl: float = 3600.0
    redis_url: str | None = None
    # Emoji config
    auto_update: bool = True
    timeout: float = 10.0
    emoji_mappings_url: str = DEFAULT_CONFIG_BASE + "emoji_mappings.json"
    mwe_url: str = DEFAULT_CONFIG_BASE + "mwe.txt"
    emoji_cache_dir: Path = PROJECT_ROOT / ".cache" / "emoji"
    emoji_refresh_seconds: float = 0.0
    # Bulk captioning: /v3/batch (synchronous) and /v3/jobs (durable, asynchronous)
    max_batch_items: int = 32
    max_batch_bytes: int = 64 * 1024 * 1024
    max_job_items: int = 10_000
    max_job_bytes: int = 1024 * 1024 * 1024
    jobs_dir: Path = PROJECT_ROOT / ".cache" / "jobs"
    jobs_db: Path | None = None  # None: <jobs_dir>/jobs.db
    jobs_ttl: float = 24 * 3600.0
    jobs_disk_quota: int = 10 * 1024 * 1024 * 1024
    max_jobs: int = 16
    job_claim_timeout: float = 300.0
    job_callback_attempts: int = 5
    job_callback_backoff: float = 2.0

    @property
    def server_threads(self) -> int:
        """waitress threads: THREADS, or enough for every queued and running model request plus
        the threads kept for /health and /metrics (waiting threads are cheap; the batcher bounds
        the model)."""
        if self.threads:
            return max(self.threads, HEALTH_RESERVE_THREADS + 1)
        return self.max_queue + self.max_batch_size + HEALTH_RESERVE_THREADS

    @property
    def analyze_slots(self) -> int:
        """Requests that may be inside the captioning routes at once; the rest of the server's
        threads stay free for /health, /metrics and the docs (extra requests get 503 at once)."""
        return self.server_threads - HEALTH_RESERVE_THREADS

    @property
    def decode_slots(self) -> int:
        return self.decode_concurrency or (os.cpu_count() or 1)

    @property
    def jobs_db_path(self) -> Path:
        """The job store's SQLite file: JOBS_DB, else jobs.db inside JOBS_DIR."""
        return self.jobs_db or self.jobs_dir / "jobs.db"

    @property
    def bind_host(self) -> str:
        """`PRIVATE=true` keeps the service on loopback, like the reference."""
        return "127.0.0.1" if self.private else self.host

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (command-line flags, tests)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **changes)

    def with_flags(self, args: Any, **fields_by_flag: str) -> Settings:
        """A copy with the command-line flags that were given applied (flag dest → field name);
        flags left at None keep the environment's value. One mapping for every CLI."""
        changes = {
            field: getattr(args, flag)
            for flag, field in fields_by_flag.items()
            if getattr(args, flag, None) is not None
        }
        return self.with_overrides(**changes)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        dotenv_path: str | os.PathLike[str] | None = ".env",
    ) -> Settings:
        """Read settings; real environment variables win over `.env` entries."""
        values: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        """Parse a mapping of variable names to strings; unset names keep defaults."""
        kw: dict[str, Any] = {}

        def get(name: str) -> str | None:
            raw = env.get(name)
            return raw if raw is not None and raw.strip() != "" else None

        def put(name: str, key: str, parse: Any) -> None:
            raw = get(name)
            if raw is not None:
                kw[key] = parse(name, raw)

        put("HOST", "host", lambda n, r: r.strip())
        put("PORT", "port", lambda n, r: _parse_int(n, r, 0, 65535))
        put("PRIVATE", "private", _parse_bool)
        put("THREADS", "threads", lambda n, r: _parse_int(n, r, 0, 1024))
        put("DRAIN_TIMEOUT", "drain_timeout", lambda n, r: _parse_float(n, r, 0.0))
        put("LOG_LEVEL", "log_level", lambda n, r: r.strip().upper())
        put("LOG_FORMAT", "log_format", _parse_log_format)
        put("CORS_ORIGINS", "cors_origins", lambda n, r: r.strip())
        put("MAX_FILE_SIZE", "max_file_size", lambda n, r: _parse_int(n, r, 1))
        put("MAX_IMAGE_PIXELS", "max_image_pixels", lambda n, r: _parse_int(n, r, 1))
        put("ALLOW_PRIVATE_URLS", "allow_private_urls", _parse_bool)
        put("FILE_ROOTS", "file_roots", lambda n, r: _parse_paths(r) or None)
        put("MAX_DOWNLOADS", "max_downloads", lambda n, r: _parse_int(n, r, 1, 1024))
        put("DECODE_CONCURRENCY", "decode_concurrency", lambda n, r: _parse_int(n, r, 0, 256))
        put("MODEL_NAME", "model_name", lambda n, r: r.strip())
        put("MODEL_TYPE", "model_type", lambda n, r: r.strip())
        put("MODEL_DIR", "model_dir", lambda n, r: Path(r.strip()).expanduser())
        put("MODEL_CONFIG", "model_config", lambda n, r: _optional_path(r))
        put("DEVICE", "device", lambda n, r: r.strip().lower())
        put("PRECISION", "precision", _parse_precision)
        put("DECODE", "decode", _parse_decode)
        put("TORCH_THREADS", "torch_threads", lambda n, r: _parse_int(n, r, 1, 1024))
        put("OMP_WAIT_POLICY", "omp_wait_policy", _parse_wait_policy)
        put("GOMP_SPINCOUNT", "omp_spin_count", _parse_spin_count)
        put("CHECKPOINT_URL", "checkpoint_url", lambda n, r: r.strip())
        put("TOKENIZER_URL", "tokenizer_url", lambda n, r: r.strip())
        put("HF_ENDPOINT", "hub_url", lambda n, r: r.strip().rstrip("/"))
        put("BLIP2_CHECKPOINT_BASE_URL", "blip2_checkpoint_base_url", lambda n, r: r.strip())
        put("MODEL_DOWNLOAD", "model_download", _parse_bool)
        put("MAX_BATCH_SIZE", "max_batch_size", lambda n, r: _parse_int(n, r, 1, 256))
        put("BATCH_WAIT_MS", "batch_wait_ms", lambda n, r: _parse_int(n, r, 0, 10_000))
        put("MAX_QUEUE", "max_queue", lambda n, r: _parse_int(n, r, 1, 100_000))
        put("REQUEST_TIMEOUT", "request_timeout", lambda n, r: _parse_float(n, r, 0.001))
        put("SHED_AT_DOOR", "shed_at_door", _parse_bool)
        put("DOOR_HOLD", "door_hold", lambda n, r: _parse_float(n, r, 0.0))
        put("CACHE_SIZE", "cache_size", lambda n, r: _parse_int(n, r, 0, 10_000_000))
        put("CACHE_TTL", "cache_ttl", lambda n, r: _parse_float(n, r, 0.0))
        put("REDIS_URL", "redis_url", lambda n, r: r.strip())
        put("AUTO_UPDATE", "auto_update", _parse_bool)
        # The reference service read API_TIMEOUT; TIMEOUT (the contract's name) wins.
        put("API_TIMEOUT", "timeout", lambda n, r: _parse_float(n, r, 0.001))
        put("TIMEOUT", "timeout", lambda n, r: _parse_float(n, r, 0.001))
        put("EMOJI_MAPPINGS_URL", "emoji_mappings_url", lambda n, r: r.strip())
        put("MWE_URL", "mwe_url", lambda n, r: r.strip())
        put("EMOJI_CACHE_DIR", "emoji_cache_dir", lambda n, r: Path(r.strip()).expanduser())
        put("EMOJI_REFRESH_SECONDS", "emoji_refresh_seconds", lambda n, r: _parse_float(n, r))
        put("MAX_BATCH_ITEMS", "max_batch_items", lambda n, r: _parse_int(n, r, 1, 10_000))
        put("MAX_BATCH_BYTES", "max_batch_bytes", lambda n, r: _parse_int(n, r, 1))
        put("MAX_JOB_ITEMS", "max_job_items", lambda n, r: _parse_int(n, r, 1, 1_000_000))
        put("MAX_JOB_BYTES", "max_job_bytes", lambda n, r: _parse_int(n, r, 1))
        put("JOBS_DIR", "jobs_dir", lambda n, r: Path(r.strip()).expanduser())
        put("JOBS_DB", "jobs_db", lambda n, r: _optional_path(r))
        put("JOBS_TTL", "jobs_ttl", lambda n, r: _parse_float(n, r, 0.001))
        put("JOBS_DISK_QUOTA", "jobs_disk_quota", lambda n, r: _parse_int(n, r, 0))
        put("MAX_JOBS", "max_jobs", lambda n, r: _parse_int(n, r, 1, 100_000))
        put("JOB_CLAIM_TIMEOUT", "job_claim_timeout", lambda n, r: _parse_float(n, r, 0.001))
        put("JOB_CALLBACK_ATTEMPTS", "job_callback_attempts", lambda n, r: _parse_int(n, r, 1, 100))
        put("JOB_CALLBACK_BACKOFF", "job_callback_backoff", lambda n, r: _parse_float(n, r, 0.0))
        return cls(**kw)


def _parse_wait_policy(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("passive", "active"):
        raise SettingsError(f"{name} must be passive or active, got {raw!r}")
    return value


_SPIN_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _parse_spin_count(name: str, raw: str) -> int:
    """GOMP_SPINCOUNT as libgomp reads it: a count with an optional k/M/G/T suffix, or
    infinite (libgomp's largest count)."""
    value = raw.strip().lower()
    if value in ("infinite", "infinity"):
        return 2**64 - 1
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)", value)
    count = int(match[1]) * _SPIN_SUFFIXES[match[2]] if match else -1
    if not 0 <= count < 2**64:
        raise SettingsError(f"{name} must be a count (e.g. 10000, 30k) or infinite, got {raw!r}")
    return count


def _parse_decode(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("fast", "stock"):
        raise SettingsError(f"{name} must be fast or stock, got {raw!r}")
    return value


def _parse_log_format(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("plain", "json"):
        raise SettingsError(f"{name} must be plain or json, got {raw!r}")
    return value


def _parse_precision(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in PRECISIONS:
        raise SettingsError(f"{name} must be one of {', '.join(PRECISIONS)}, got {raw!r}")
    return value
