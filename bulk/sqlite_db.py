"""One SQLite file used safely from many threads: WAL, a busy timeout, IMMEDIATE write
transactions and consistent read snapshots, the schema applied once and versioned.

The job store (bulk/job_store.py) keeps its queries; this module keeps the connection rules.
A lock serialises use of the one connection (SQLite serialises writers anyway); a write that
stays locked past the busy timeout, a full disk or an I/O error becomes `StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from bulk.jobs import JobStoreError, StoreUnavailable

log = logging.getLogger(__name__)


class SqliteDb:
    """The connection to one database file, created with `schema` if missing."""

    def __init__(
        self,
        path: Path,
        schema: str,
        schema_version: int,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreError(f"cannot open the job store {path}: {exc}") from exc
        try:
            self._prepare(schema, schema_version, synchronous, busy_timeout)
        except sqlite3.Error as exc:
            self._conn.close()
            raise JobStoreError(f"cannot open the job store {path}: {exc}") from exc
        except BaseException:
            self._conn.close()
            raise

    def _prepare(self, schema: str, version: int, synchronous: str, busy_timeout: float) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise JobStoreError(f"{self.path}: the database cannot use WAL mode")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        with self.write() as tx:
            found = tx.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, version):
                raise JobStoreError(f"{self.path}: unknown job store schema version {found}")
            for statement in filter(str.strip, schema.split(";")):
                tx.execute(statement)
            tx.execute(f"PRAGMA user_version = {version}")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (IMMEDIATE) so it never deadlocks on upgrade."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # locked too long, disk full, I/O
                    log.error("job store %s: %s", self.path, exc)
                    raise StoreUnavailable("the job store is unavailable; try again later") from exc
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """One consistent read snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
