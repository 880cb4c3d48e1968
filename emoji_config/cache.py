"""The on-disk cache of the last good config files, written so a crash never corrupts it.

Each file is stored byte for byte as downloaded (`emoji_mappings.json`, `mwe.txt`), next to a
small `<name>.meta.json` with the HTTP validators and timestamps. Both are replaced by rename, so a
reader sees either the old or the new file, never a mix. The meta carries the data's SHA-256: if a
crash lands between the two renames, the mismatch is noticed and the meta is ignored (the data is
still good; only the conditional-request validators are lost).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bounded_io import remove_stale_temporaries, write_atomic

__all__ = ["CacheEntry", "read_entry", "remove_stale_temporaries", "write_atomic", "write_entry"]

logger = logging.getLogger(__name__)

META_SUFFIX = ".meta.json"
MAX_META_BYTES = 64 * 1024


def sha256(data: bytes) -> str:
    """Hex digest used to tie a meta file to its data file."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    """One cached file: its bytes and the meta that belongs to them (empty if unknown)."""

    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)


def _meta_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}{META_SUFFIX}"


def read_entry(cache_dir: Path, name: str, max_bytes: int) -> CacheEntry | None:
    """The cached copy of `name`, or None when absent, unreadable or too large.

    A meta file that does not describe these exact bytes is replaced by one holding only the
    file's modification time, so a hand-placed file works too.
    """
    path = cache_dir / name
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("emoji cache: cannot read %s: %s", path, exc)
        return None
    if len(data) > max_bytes:
        logger.warning("emoji cache: %s is larger than %d bytes, ignored", path, max_bytes)
        return None
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        raw = _meta_path(cache_dir, name).read_bytes()[:MAX_META_BYTES]
        loaded = json.loads(raw)
        if isinstance(loaded, dict) and loaded.get("sha256") == sha256(data):
            meta = loaded
    if not meta:
        meta = {"fetched_at": mtime, "checked_at": mtime}
    return CacheEntry(data, meta)


def write_meta(cache_dir: Path, name: str, meta: dict[str, Any]) -> None:
    """Replace the meta file of `name` atomically."""
    payload = json.dumps(meta, sort_keys=True, indent=1).encode()
    write_atomic(_meta_path(cache_dir, name), payload)


def write_entry(
    cache_dir: Path,
    name: str,
    data: bytes,
    meta: dict[str, Any],
) -> None:
    """Store a validated download: data first, then its meta (with the data's SHA-256)."""
    write_atomic(cache_dir / name, data)
    write_meta(cache_dir, name, {**meta, "sha256": sha256(data)})
