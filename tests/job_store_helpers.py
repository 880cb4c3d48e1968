"""Shared by the SQLite job store tests (tests/test_job_store*.py): a settable clock, items, and
the `db` and `store` fixtures (a test module imports them by name: `from job_store_helpers import
store as store`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bulk.job_store import SqliteJobStore
from bulk.jobs import NewItem


class Clock:
    """Settable time for timeout and retention tests."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def items(n: int, prefix: str = "img") -> list[NewItem]:
    return [NewItem(f"{prefix}{i}.png", f"/spool/{prefix}{i}.png") for i in range(n)]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def store(db: Path):
    s = SqliteJobStore(db, synchronous="NORMAL")
    yield s
    s.close()
