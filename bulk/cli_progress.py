"""Taking the folder CLI's outcomes as they come: write, count, show progress, report failures.

Both engines (the in-process pipeline and Ray) yield one :class:`Outcome` per input, in the
order they finish; :func:`record` is the one loop that consumes them, so the output file, the
progress bar and the closing summary are the same whichever engine ran. Progress and failures
go to stderr (a tqdm bar with images/s and ETA; one ``failed:`` line per bad input above it),
the captions to the output file only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TextIO

from bulk.cli_output import record as output_row

if TYPE_CHECKING:
    from tqdm import tqdm

    from bulk.cli_inputs import Input
    from bulk.cli_output import Sink

Status = Literal["captioned", "skipped", "failed"]
#: Failures kept for the summary; the rest are counted (each was printed when it happened).
MAX_LISTED_FAILURES = 20


class EngineError(RuntimeError):
    """The engine cannot run at all (no model, no Ray); the message says why."""


@dataclass(frozen=True)
class Outcome:
    """What became of one input: captioned (with predictions), skipped (already done), failed."""

    item: Input
    status: Status
    sha256: str = ""
    predictions: list[dict[str, Any]] | None = None
    error: str = ""


@dataclass
class Summary:
    """Counts of one run, and the first failures."""

    total: int
    captioned: int = 0
    skipped: int = 0
    failed: int = 0
    unmatched: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)
    first_result: float | None = None  # model start-up ends here (Ray actors load lazily)
    last_result: float | None = None

    @property
    def ok(self) -> bool:
        return not (self.failed or self.unmatched or self.interrupted)

    def add(self, outcome: Outcome) -> None:
        if outcome.status == "captioned":
            self.captioned += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            if len(self.failures) < MAX_LISTED_FAILURES:
                self.failures.append((outcome.item.name, outcome.error))

    def lines(self, out_path: str) -> list[str]:
        """The closing report, one line per fact."""
        now = time.monotonic()
        first = self.first_result if self.first_result is not None else now
        working = (self.last_result or now) - first
        rate = self.captioned / working if working > 0 else 0.0
        left = self.total - self.captioned - self.skipped - self.failed
        head = (
            f"{self.total} images: {self.captioned} captioned, {self.skipped} already done, "
            f"{self.failed} failed"
        )
        if left > 0:
            head += f", {left} not run"
        lines = [
            f"{head} -> {out_path} ({now - self.started:.1f} s: first result after "
            f"{first - self.started:.1f} s, then {rate:.1f} images/s)"
        ]
        lines += [f"nothing matches: {arg}" for arg in self.unmatched]
        if self.failed:
            lines.append(f"failed ({self.failed}):")
            lines += [f"  {name}: {error}" for name, error in self.failures]
            if self.failed > len(self.failures):
                lines.append(f"  ... and {self.failed - len(self.failures)} more (printed above)")
        if self.interrupted:
            lines.append("interrupted: run the same command again to caption the rest")
        return lines


def progress_bar(total: int, *, enabled: bool, stream: TextIO | None = None) -> tqdm:
    """A tqdm bar counting images, with images/s and ETA, on stderr."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        desc="captioning",
        file=stream or sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def record(
    outcomes: Iterator[Outcome],
    sink: Sink,
    summary: Summary,
    bar: tqdm,
    *,
    limit: int | None = None,
) -> None:
    """Write each captioned outcome, count it, advance the bar; stop after `limit` captioned.

    Stopping closes `outcomes`, so the engine stops handing out work."""
    try:
        for outcome in outcomes:
            if summary.first_result is None:  # rate and ETA from here, not from model loading
                summary.first_result = time.monotonic()
                bar.reset(total=bar.total)
            if outcome.status == "captioned":
                sink.write(output_row(outcome.item, outcome.sha256, outcome.predictions or []))
            elif outcome.status == "failed":
                bar.write(f"failed: {outcome.item.name}: {outcome.error}", file=sys.stderr)
            summary.add(outcome)
            summary.last_result = time.monotonic()
            bar.update(1)
            bar.set_postfix(done=summary.skipped, failed=summary.failed, refresh=False)
            if limit is not None and summary.captioned >= limit:
                break
    finally:
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()
