"""What the folder CLI was asked to caption: its arguments expanded into an ordered list of inputs.

    caption photos/ 'shots/**/*.jpg' one.png https://example.org/a.jpg @urls.txt

Each argument is, in this order of tests:

- ``@FILE``: a list file, one entry per line (blank lines and ``#`` comments skipped); a line
  that starts with ``http://`` or ``https://`` is a URL, any other line a file path (relative
  paths are relative to the list file's folder);
- an ``http://`` or ``https://`` URL;
- an existing folder: the image files in it (with ``recursive``, in every folder below it too);
- an existing file: that file, whatever its name (it was named, so it is tried);
- otherwise a glob pattern (``**`` spans folders when ``recursive``): the image files it
  matches.

Folders and patterns keep only names with an image extension (the upload rule's list plus TIFF)
and are sorted, so two runs see the same order. Paths are made absolute, so a rerun from another
folder still recognises what it already did; an input named twice is kept once. Arguments that
match nothing are reported back, not raised: the rest still runs.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from image_input.sources import ALLOWED_EXTENSIONS

#: Suffixes picked from folders and patterns: what uploads allow, plus TIFF (decode reads it).
IMAGE_EXTENSIONS = ALLOWED_EXTENSIONS | {"tif", "tiff"}
URL_PREFIXES = ("http://", "https://")
LIST_PREFIX = "@"
#: A list file longer than this is refused (a list of 1M URLs is ~100 MB; more is a mistake).
MAX_LIST_BYTES = 256 * 1024 * 1024

InputKind = Literal["file", "url"]


@dataclass(frozen=True)
class Input:
    """One image to caption: a file (absolute path) or a URL."""

    kind: InputKind
    name: str

    @property
    def key(self) -> str:
        """The output field naming this input: ``path`` or ``url``."""
        return "path" if self.kind == "file" else "url"


@dataclass
class Expanded:
    """The inputs found, in order and without repeats, and the arguments that found nothing."""

    inputs: list[Input] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    _seen: set[Input] = field(default_factory=set, repr=False)

    def add(self, item: Input) -> None:
        if item not in self._seen:
            self._seen.add(item)
            self.inputs.append(item)


class InputError(ValueError):
    """An argument that cannot be used at all (an unreadable list file)."""


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_PREFIXES)


def has_image_extension(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def entry(text: str, base: Path | None = None) -> Input:
    """A URL or a path (relative to `base` when given) as an input."""
    if is_url(text):
        return Input("url", text)
    path = Path(text).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return Input("file", os.path.abspath(path))


def expand(args: Iterable[str], *, recursive: bool = False) -> Expanded:
    """Every input the arguments name, in argument order."""
    found = Expanded()
    for arg in args:
        matched = False
        for item in _expand_one(arg, recursive):
            matched = True
            found.add(item)
        if not matched:
            found.unmatched.append(arg)
    return found


def _expand_one(arg: str, recursive: bool) -> Iterator[Input]:
    if arg.startswith(LIST_PREFIX):
        yield from read_list(Path(arg[len(LIST_PREFIX) :]).expanduser())
    elif is_url(arg):
        yield Input("url", arg)
    elif os.path.isdir(arg):
        yield from _folder(Path(arg), recursive)
    elif os.path.lexists(arg):
        yield entry(arg)
    else:
        yield from _pattern(arg, recursive)


def _folder(folder: Path, recursive: bool) -> Iterator[Input]:
    pattern = "**/*" if recursive else "*"
    names = (p for p in folder.glob(pattern) if has_image_extension(p.name) and p.is_file())
    for path in sorted(names):
        yield entry(str(path))


def _pattern(pattern: str, recursive: bool) -> Iterator[Input]:
    matches = glob.glob(os.path.expanduser(pattern), recursive=recursive)
    for name in sorted(matches):
        if has_image_extension(name) and os.path.isfile(name):
            yield entry(name)


def read_list(path: Path) -> Iterator[Input]:
    """The entries of a list file (`@FILE`): URLs and paths, one per line."""
    try:
        size = path.stat().st_size
        if size > MAX_LIST_BYTES:
            raise InputError(f"list file {path} is larger than {MAX_LIST_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read list file {path}: {exc}") from None
    base = path.resolve().parent
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            yield entry(stripped, base)


def _open_parquet(path: Path, column: str) -> Any:
    """The Parquet file, checked to have `column`; InputError otherwise."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"--parquet needs pyarrow (uv sync --group ray): {exc}") from None
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read Parquet file {path}: {exc}") from None
    if column not in parquet.schema_arrow.names:
        names = ", ".join(parquet.schema_arrow.names)
        raise InputError(f"{path} has no column {column!r} (columns: {names})")
    return parquet


def _cells(parquet: Any, column: str) -> Iterator[str]:
    for group in range(parquet.num_row_groups):  # one row group in memory at a time
        for value in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                yield value.strip()


def parquet_column(path: Path, column: str) -> Iterator[Input]:
    """The entries of one string column of a Parquet file (``--parquet FILE --column NAME``):
    URLs and paths as in a list file (relative to the file's folder); empty cells skipped."""
    parquet = _open_parquet(path, column)
    base = path.resolve().parent
    for value in _cells(parquet, column):
        yield entry(value, base)


def parquet_count(path: Path, column: str) -> int:
    """How many entries :func:`parquet_column` would give (for a progress bar's total)."""
    parquet = _open_parquet(path, column)
    return sum(1 for _ in _cells(parquet, column))
