"""One connection to `mta.db`: the file, its transactions, and its change counters.

`Connection` is the base every table mixin of `mta.db.Database` builds on: it opens
(and creates, privately) the SQLite file in WAL mode, migrates it, and hands out
`transaction()` for writes and `_read()` / `_consistent_read()` for reads.  Every
method blocks; one connection is shared between threads, serialised by a lock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Self

from mta.db.schema import Migration, load_migrations, migrate


def match_owner(path: str, reference: str) -> None:
    """When running as root, give `path` the owner of `reference` (else nothing)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        st = os.stat(reference)
        os.chown(path, st.st_uid, st.st_gid)


def _create_private(path: str) -> None:
    """Create the database file readable only by its owner: it holds password hashes.

    SQLite gives the -wal and -shm files the same mode.  When root (mta-admin run by
    the operator) creates it, it goes to the owner of the data directory so the
    daemon, running as its own user, can still open it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o750, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    match_owner(path, directory)


class Connection:
    """A connection to `mta.db`, migrated to the current schema on open.

    `clock` supplies timestamps, so tests control them.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] | None = None,
        timeout: float = 10.0,
    ):
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        if path != ":memory:":
            _create_private(path)
        self._conn = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            migrate(
                path,
                self._read,
                self.transaction,
                load_migrations() if migrations is None else migrations,
            )
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested uses join the outermost one.

        The CLI wraps a change and its audit row in one, so neither exists alone.
        """
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextlib.contextmanager
    def _consistent_read(self) -> Iterator[sqlite3.Connection]:
        """Several SELECTs that see one state of the file (a deferred transaction
        takes no write lock, so mta-admin is never blocked by it)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("ROLLBACK")

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self._read() as conn:
            return conn.execute("PRAGMA data_version").fetchone()[0]
