"""The SQLite engine under `mta.db`: one private file, one connection, WAL mode.

The file holds password hashes, so it is created readable by its owner only.  One
connection is shared between threads and serialised by a lock (SQLite has one
writer anyway); `BEGIN IMMEDIATE` takes the write lock at the start of a
transaction, so a read-modify-write (lockout counters) never loses an update to
`mta-admin` or another process.  The schema version is `PRAGMA user_version`
(`mta.db.schema`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence

from mta.db.schema import Migration, migrate, schema_version

PAGE_SIZE = 16384  # of a database file this engine creates


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


class SQLiteEngine:
    """The file at `path`, opened (created privately) in WAL mode."""

    dialect = "sqlite"

    def __init__(self, path: str, *, timeout: float = 10.0):
        self.path = path
        self._lock = threading.RLock()
        if path != ":memory:":
            _create_private(path)
        self._conn = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            # Set before the first table is written (a no-op on a file that has any):
            # the SQL store keeps whole messages, and at 16 KiB a 100 KB message is 7
            # overflow pages instead of 25, which made its deliveries ~30% cheaper.
            self._conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self._conn.execute("PRAGMA journal_mode=WAL")
        except BaseException:
            self._conn.close()
            raise

    def migrate(self, migrations: Sequence[Migration], *, apply: bool = True) -> list[Migration]:
        """Apply the migrations not applied yet; returns the ones this call applied
        (with `apply=False`: none applied, the missing ones returned)."""
        if apply:
            return migrate(self.path, self.read, self.transaction, migrations)
        current = self.schema_version()
        latest = migrations[-1].version if migrations else 0
        if current > latest:
            migrate(self.path, self.read, self.transaction, migrations)  # raises: newer
        return [m for m in migrations if m.version > current]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested uses join the outermost one.  SQLite has one
        writer: `exclusive` changes nothing here."""
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
    def read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextlib.contextmanager
    def consistent_read(self) -> Iterator[sqlite3.Connection]:
        """Several SELECTs that see one state of the file (a deferred transaction
        takes no write lock, so mta-admin is never blocked by it)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("ROLLBACK")

    def schema_version(self) -> int:
        with self.read() as conn:
            return schema_version(conn)

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self.read() as conn:
            return conn.execute("PRAGMA data_version").fetchone()[0]

    def ping(self) -> str:
        with self.read() as conn:
            conn.execute("SELECT 1").fetchone()
        return "reachable"
