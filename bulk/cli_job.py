"""One run of the folder CLI: inputs → engine → output file, progress and the closing summary.

Kept apart from the flag parsing (bulk/cli.py) so both engines run the same steps: expand the
arguments, open the output (which tells what is already done), start the engine (the in-process
runtime, or Ray), feed it the inputs, record what comes back, stop, report. The engine is
stopped and the output closed whatever happens, Ctrl-C included, so a rerun can resume.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Protocol

from bulk.cli_inputs import Input, InputError, expand, parquet_column
from bulk.cli_local import LocalRunner
from bulk.cli_output import open_sink
from bulk.cli_progress import EngineError, Outcome, Summary, progress_bar, record
from captioning.errors import InvalidOption

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from captioning.options import GenerationOptions
    from settings import Settings

PROG = "caption"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class JobError(Exception):
    """The run cannot start (unreadable list, unwritable output, no model); said on stderr."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Engine(Protocol):
    def start(self) -> None: ...

    def count(self, inputs: list[Input]) -> int: ...

    def outcomes(self, inputs: Iterable[Input], done: dict[str, str]) -> Iterator[Outcome]: ...

    def stop(self) -> None: ...


class LocalEngine(LocalRunner):
    def count(self, inputs: list[Input]) -> int:
        return len(inputs)


class CliJob:
    """Everything one `caption` command does after its flags are parsed."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: Settings,
        options: GenerationOptions,
        tags: bool,
    ) -> None:
        self.args = args
        self.settings = settings
        self.options = options
        self.tags = tags

    def _inputs(self) -> tuple[list[Input], list[str]]:
        try:
            found = expand(self.args.inputs, recursive=self.args.recursive)
            if self.args.parquet is not None and not self.args.ray:
                for item in parquet_column(self.args.parquet, self.args.column):
                    found.add(item)
        except InputError as exc:
            raise JobError(str(exc)) from None
        return found.inputs, found.unmatched

    def _engine(self) -> Engine:
        if not self.args.ray:
            return LocalEngine(self.settings, self.options, tags=self.tags)
        from bulk.ray_pipeline import RayRunner

        parquet = None if self.args.parquet is None else (self.args.parquet, self.args.column)
        return RayRunner(
            self.settings,
            self.options,
            tags=self.tags,
            address=self.args.ray_address,
            actors=self.args.actors,
            num_gpus=self.args.num_gpus,
            object_store_mb=self.args.ray_object_store_mb,
            parquet=parquet,
        )

    def run(self) -> int:
        inputs, unmatched = self._inputs()
        try:
            sink = open_sink(self.args.out)
        except (OSError, RuntimeError, ValueError) as exc:  # ValueError: not a Parquet file
            raise JobError(f"cannot open {self.args.out}: {exc}") from None
        engine = self._engine()
        summary = Summary(total=len(inputs), unmatched=unmatched)
        bar = None
        try:
            summary.total = engine.count(inputs)
            engine.start()
            bar = progress_bar(summary.total, enabled=not self.args.quiet)
            record(engine.outcomes(inputs, sink.done), sink, summary, bar, limit=self.args.limit)
        except KeyboardInterrupt:
            summary.interrupted = True
        except (EngineError, InputError) as exc:
            raise JobError(str(exc)) from None
        except InvalidOption as exc:  # options this model cannot serve (prompt vs max_length)
            raise JobError(exc.message, EXIT_USAGE) from None
        finally:
            if bar is not None:
                bar.close()
            sink.close()
            engine.stop()
        for line in summary.lines(str(self.args.out)):
            print(f"{PROG}: {line}", file=sys.stderr)
        if summary.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if summary.ok else EXIT_FAILED
