"""The service's emoji config: where it comes from, how it is kept fresh, and what is in use.

Sources, best first: a download (`EMOJI_MAPPINGS_URL`, `MWE_URL`), the on-disk cache of the last
good download (`EMOJI_CACHE_DIR`), and the default bundled in `emoji_config/bundled/`. Every
download is validated before it replaces anything, so a bad download never costs the last good
copy. Each file (table, phrase list) is taken from its best good source; if either has no good
copy at all the bundled pair is used for both, because a table and a phrase list from different
vocabularies do not belong together.

The config in use is one immutable snapshot (mapper + provenance). Refreshing builds a new one and
swaps it in with a single assignment, so concurrent requests see the old config or the new one,
never a mix.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from emoji_config.cache import (
    read_entry,
    remove_stale_temporaries,
    sha256,
    write_entry,
    write_meta,
)
from emoji_config.fetch import FetchError, fetch
from emoji_config.mapper import EmojiMapper
from emoji_config.validate import MAPPINGS_NAME, MAX_BYTES, MWE_NAME, PARSERS, ConfigError

if TYPE_CHECKING:
    from settings import Settings

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
NAMES = (MAPPINGS_NAME, MWE_NAME)
Source = Literal["remote", "cache", "bundled"]


@dataclass(frozen=True)
class FileCopy:
    """One good copy of one config file and where it came from.

    `fetched_at`: when these bytes were downloaded; `checked_at`: when the remote last confirmed
    them (download or 304). Both are Unix times, None for the bundled default.
    """

    name: str
    parsed: dict[str, str] | list[str]
    source: Source
    sha256: str
    url: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    fetched_at: float | None = None
    checked_at: float | None = None

    def meta(self) -> dict[str, Any]:
        """What the cache keeps about this copy."""
        return {
            "url": self.url,
            "etag": self.etag,
            "last_modified": self.last_modified,
            "fetched_at": self.fetched_at,
            "checked_at": self.checked_at,
        }


@dataclass(frozen=True)
class Snapshot:
    """The config in use: the mapper and the two copies it was built from."""

    mapper: EmojiMapper
    mappings: FileCopy
    mwe: FileCopy

    @property
    def source(self) -> Source:
        sources = {self.mappings.source, self.mwe.source}
        return "bundled" if "bundled" in sources else "cache" if "cache" in sources else "remote"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds")


def _oldest(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else min(cast(list[float], values))


class EmojiConfigStore:
    """Loads, caches, refreshes and serves the emoji config for the HTTP layer."""

    def __init__(self, settings: Settings) -> None:
        self._auto_update = settings.auto_update
        self._timeout = settings.timeout
        self._refresh_seconds = settings.emoji_refresh_seconds
        self._cache_dir = Path(settings.emoji_cache_dir)
        self._urls = {MAPPINGS_NAME: settings.emoji_mappings_url, MWE_NAME: settings.mwe_url}
        self._bundled: tuple[FileCopy, FileCopy] | None = None
        self._best: dict[str, FileCopy] = {}  # best non-bundled copy of each file
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()  # guards _best and snapshot building/swapping
        self._refresh_lock = threading.Lock()  # one download round at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._last_attempt: float | None = None

    # ----- start-up -------------------------------------------------------------------------

    def load(self) -> None:
        """Make a config available: cache or bundled at once, then a download if it comes in time.

        With AUTO_UPDATE the download runs in a worker thread that start-up waits for at most
        TIMEOUT seconds; if it finishes later its result is applied then. Never raises for
        network or config problems; they are logged and reported by `health()`.
        """
        remove_stale_temporaries(self._cache_dir)
        for name in NAMES:
            copy = self._read_cache(name)
            if copy is not None:
                with self._lock:
                    self._best[name] = copy
        with self._lock:
            self._install_locked()
        if self._auto_update:
            worker = threading.Thread(
                target=self._refresh_quietly, name="emoji-config-fetch", daemon=True
            )
            worker.start()
            worker.join(self._timeout)
            if worker.is_alive():
                logger.warning(
                    "emoji config: download not done after %.1f s; starting with the local copy",
                    self._timeout,
                )
        snapshot = self._current()
        logger.info(
            "emoji config: %s (%d mappings, %d phrases)",
            snapshot.source,
            snapshot.mapper.mappings_count,
            snapshot.mapper.mwes_count,
        )

    def _read_cache(self, name: str) -> FileCopy | None:
        entry = read_entry(self._cache_dir, name, MAX_BYTES[name])
        if entry is None:
            return None
        try:
            parsed = PARSERS[name](entry.data)
        except ConfigError as exc:
            logger.warning("emoji config: cached copy unusable: %s", exc)
            return None
        meta = entry.meta
        return FileCopy(
            name=name,
            parsed=parsed,
            source="cache",
            sha256=sha256(entry.data),
            url=_text(meta.get("url")),
            etag=_text(meta.get("etag")),
            last_modified=_text(meta.get("last_modified")),
            fetched_at=_number(meta.get("fetched_at")),
            checked_at=_number(meta.get("checked_at")),
        )

    def _bundled_pair(self) -> tuple[FileCopy, FileCopy]:
        """The default shipped with the code (parsed once; a broken one is a packaging bug)."""
        if self._bundled is None:
            copies = []
            for name in NAMES:
                data = (BUNDLED_DIR / name).read_bytes()
                copies.append(FileCopy(name, PARSERS[name](data), "bundled", sha256(data)))
            self._bundled = (copies[0], copies[1])
        return self._bundled

    # ----- refresh --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """One conditional download round (both files); returns True if the config changed.

        Bounded by TIMEOUT overall. A failed or invalid download keeps the copy in use.
        """
        with self._refresh_lock:
            deadline = time.monotonic() + self._timeout
            errors = []
            for name in NAMES:
                try:
                    self._refresh_file(name, deadline)
                except (FetchError, ConfigError) as exc:
                    logger.warning("emoji config: %s from %s: %s", name, self._urls[name], exc)
                    errors.append(f"{name}: {exc}")
            self._error = "; ".join(errors) or None
            self._last_attempt = time.time()
            with self._lock:
                return self._install_locked()

    def _refresh_quietly(self) -> None:
        """`refresh` for background threads: an unexpected bug is logged, never fatal."""
        try:
            self.refresh()
        except Exception:
            logger.exception("emoji config: refresh failed")

    def _refresh_file(self, name: str, deadline: float) -> None:
        url = self._urls[name]
        held = self._best.get(name)
        # Validators only go back to the URL they came from.
        known = held if held is not None and held.url == url else None
        result = fetch(
            url,
            deadline=deadline,
            max_bytes=MAX_BYTES[name],
            etag=known.etag if known else None,
            last_modified=known.last_modified if known else None,
            cancel=self._stop,
        )
        now = time.time()
        if known is not None and result.not_modified:  # 304: the copy we hold is current
            copy = replace(known, source="remote", checked_at=now)
            self._store(copy, None)
        else:
            data = cast(bytes, result.data)  # fetch() only says "not modified" to validators
            copy = FileCopy(
                name=name,
                parsed=PARSERS[name](data),
                source="remote",
                sha256=sha256(data),
                url=url,
                etag=result.etag,
                last_modified=result.last_modified,
                fetched_at=now,
                checked_at=now,
            )
            self._store(copy, data)
        with self._lock:
            self._best[copy.name] = copy

    def _store(self, copy: FileCopy, data: bytes | None) -> None:
        """Write a good copy (or, for a 304, just its meta) to the cache; failure is not fatal."""
        try:
            if data is None:
                write_meta(self._cache_dir, copy.name, {**copy.meta(), "sha256": copy.sha256})
            else:
                write_entry(self._cache_dir, copy.name, data, copy.meta())
        except OSError as exc:
            logger.warning("emoji config: cannot write cache in %s: %s", self._cache_dir, exc)

    def _install_locked(self) -> bool:
        """Build and swap in the best config; a rebuild only when the content changed."""
        mappings, mwe = self._best.get(MAPPINGS_NAME), self._best.get(MWE_NAME)
        if mappings is None or mwe is None:
            missing = MAPPINGS_NAME if mappings is None else MWE_NAME
            if self._snapshot is None or self._snapshot.source != "bundled":
                logger.warning(
                    "emoji config: no good copy of %s; using the bundled default", missing
                )
            mappings, mwe = self._bundled_pair()
        old = self._snapshot
        if old and old.mappings.sha256 == mappings.sha256 and old.mwe.sha256 == mwe.sha256:
            self._snapshot = replace(old, mappings=mappings, mwe=mwe)
            return False
        mapper = EmojiMapper(cast(dict[str, str], mappings.parsed), cast(list[str], mwe.parsed))
        self._snapshot = Snapshot(mapper, mappings, mwe)
        return True

    def start_refresh(self) -> None:
        """Refresh every EMOJI_REFRESH_SECONDS in a daemon thread (no-op when 0 or offline)."""
        if self._refresh_seconds <= 0:
            return
        if not self._auto_update:
            logger.info("emoji config: EMOJI_REFRESH_SECONDS ignored because AUTO_UPDATE is off")
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._refresh_loop, name="emoji-config-refresh", daemon=True
        )
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_seconds):
            self._refresh_quietly()

    def close(self) -> None:
        """Stop the refresh thread (an in-flight download is cancelled at its next read)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
            if thread.is_alive():
                logger.warning("emoji config: refresh thread still busy at close")

    # ----- use ------------------------------------------------------------------------------

    def _current(self) -> Snapshot:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError("EmojiConfigStore.load() has not been called")
        return snapshot

    @property
    def mapper(self) -> EmojiMapper:
        """The mapper in use right now (hold on to it for a consistent view)."""
        return self._current().mapper

    def map(self, caption: str) -> list[dict[str, str]]:
        """Map a caption with the config in use (see `EmojiMapper.map`)."""
        return self._current().mapper.map(caption)

    def health(self) -> dict[str, Any]:
        """Where the config in use came from, its size and age, and the last download error."""
        snapshot = self._snapshot
        if snapshot is None:
            return {"source": None, "status": "not_loaded", "error": self._error}
        copies = (snapshot.mappings, snapshot.mwe)
        checked = _oldest([c.checked_at for c in copies])
        return {
            "source": snapshot.source,
            "mappings": snapshot.mapper.mappings_count,
            "mwes": snapshot.mapper.mwes_count,
            "age_seconds": None if checked is None else round(max(time.time() - checked, 0), 1),
            "fetched_at": _iso(_oldest([c.fetched_at for c in copies])),
            "checked_at": _iso(checked),
            "last_attempt_at": _iso(self._last_attempt),
            "error": self._error,
            "auto_update": self._auto_update,
            "refresh_seconds": self._refresh_seconds,
            "files": {
                c.name: {
                    "source": c.source,
                    "fetched_at": _iso(c.fetched_at),
                    "etag": c.etag,
                    "sha256": c.sha256[:16],
                }
                for c in copies
            },
        }
