"""Where the folder CLI's captions go, and what an earlier run already wrote there.

One line (or Parquet row) per captioned image, the same fields whichever engine made it (the
in-process pipeline or Ray)::

    {"path": "/abs/photo.jpg", "sha256": "…", "predictions": [{"text": "…", "emoji_mappings": […]}]}

(``url`` instead of ``path`` for a downloaded image; ``predictions`` exactly as the API answers
them.) Only captioned images are written; failures go to the report, so the file is a plain
list of results that a rerun can trust.

Resuming: a sink opens its file first and reads what is there — ``done`` maps each path or URL
to the SHA-256 it was captioned from. A file is skipped when its bytes still hash to that value
(changed files are captioned again and the new line appended: the last line for a path wins);
a URL is skipped when it is there at all (checking it would mean downloading it again).

- JSON Lines is appended line by line and flushed after each, so a crash loses at most the
  lines in flight and leaves at most one torn last line; the next run cuts that line off before
  appending (a damaged line elsewhere is reported and ignored).
- Parquet cannot be appended to: the new file is written beside the old one (old rows copied
  first, new ones streamed in row groups) and renamed over it at the end, so a crash leaves the
  previous file whole but loses that run's rows (an interrupt with Ctrl-C still writes them).
  Use JSON Lines for long runs. Parquet needs
  pyarrow (the ``ray`` dependency group).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bounded_io import fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa

    from bulk.cli_inputs import Input

log = logging.getLogger(__name__)

NAME_KEYS = ("path", "url")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_ROW_GROUP = 1000
_FSYNC_EVERY = 256  # JSON Lines: lines between fsyncs (a flush after every line regardless)


def record(item: Input, sha256: str, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """One output row: the input's name, its bytes' SHA-256, its predictions."""
    return {item.key: item.name, "sha256": sha256, "predictions": predictions}


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


class Sink(Protocol):
    """An output file open for appending rows, knowing the rows already there."""

    path: Path
    done: dict[str, str]

    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def open_sink(path: Path) -> Sink:
    """A Parquet sink for ``*.parquet``/``*.pq``, else JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return ParquetSink(path) if is_parquet(path) else JsonlSink(path)


def _remember(done: dict[str, str], row: dict[str, Any]) -> bool:
    for key in NAME_KEYS:
        name = row.get(key)
        if isinstance(name, str) and isinstance(row.get("sha256"), str):
            done[name] = row["sha256"]
            return True
    return False


# --------------------------------------------------------------------------- JSON Lines


class JsonlSink:
    """Appends one JSON object per line; a torn last line from a crash is cut off first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, str] = {}
        self.damaged = 0
        good_end = self._read_existing() if path.exists() else 0
        self._file = open(path, "ab")  # noqa: SIM115  (kept open for the whole run)
        if self._file.tell() > good_end:
            log.warning("%s: cutting off a torn last line from an interrupted run", path)
            self._file.truncate(good_end)
            self._file.seek(good_end)
        self._unsynced = 0

    def _read_existing(self) -> int:
        """Fill `done`; return the offset just past the last complete line."""
        good_end = 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # torn by a crash mid-write: cut off in __init__
                good_end += len(line)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or not _remember(self.done, row):
                    self.damaged += 1
                    log.warning("%s:%d: not a caption line, ignored", self.path, number)
        return good_end

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        self._file.flush()
        self._unsynced += 1
        if self._unsynced >= _FSYNC_EVERY:
            os.fsync(self._file.fileno())
            self._unsynced = 0

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


# --------------------------------------------------------------------------- Parquet


def parquet_schema() -> pa.Schema:
    """The rows' Parquet schema: predictions as nested lists and structs, not JSON text."""
    import pyarrow as pa

    mapping = pa.struct([("emoji", pa.string()), ("word", pa.string())])
    prediction = pa.struct(
        [
            ("text", pa.string()),
            ("emoji_mappings", pa.list_(mapping)),
            ("tags", pa.list_(pa.string())),
        ]
    )
    return pa.schema(
        [
            ("path", pa.string()),
            ("url", pa.string()),
            ("sha256", pa.string()),
            ("predictions", pa.list_(prediction)),
        ]
    )


def without_nulls(value: Any) -> Any:
    """A row read back from Parquet in its JSON Lines form (absent fields are nulls there)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def read_parquet_rows(path: Path) -> list[dict[str, Any]]:
    """Every row of a Parquet output, as JSON Lines would hold it (tests, tools)."""
    import pyarrow.parquet as pq

    return [without_nulls(row) for row in pq.read_table(path).to_pylist()]


def _import_pyarrow() -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"Parquet output needs pyarrow (uv sync --group ray): {exc}") from None


class ParquetSink:
    """Writes a new Parquet file beside the old one (old rows first) and renames it over."""

    def __init__(self, path: Path) -> None:
        _import_pyarrow()
        import pyarrow.parquet as pq

        self.path = path
        self.done: dict[str, str] = {}
        self.schema = parquet_schema()
        old = pq.ParquetFile(path) if path.exists() else None  # not Parquet: fail before writing
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a crashed run
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._rows: list[dict[str, Any]] = []
        if old is not None:
            self._copy_existing(old)

    def _copy_existing(self, old: Any) -> None:
        for group in range(old.num_row_groups):
            table = old.read_row_group(group).select(self.schema.names).cast(self.schema)
            for row in table.select(["path", "url", "sha256"]).to_pylist():
                _remember(self.done, row)
            self._writer.write_table(table)

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append({name: row.get(name) for name in self.schema.names})
        if len(self._rows) >= PARQUET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        """Write what is left and move the new file into place (durably)."""
        if self._writer is None:
            return
        self._flush()
        self._writer.close()
        self._writer = None
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
