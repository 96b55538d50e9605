"""The PostgreSQL engine under `mta.db` (`[database] dsn = "postgresql://..."`).

It offers what `mta.db.sqlite.SQLiteEngine` offers (`transaction`, `read`,
`consistent_read`, the schema and change counters), so the table mixins keep one
set of queries.  The seam between the two dialects is small:

- Placeholders: the queries are written with SQLite's `?`; `Session` rewrites
  them to psycopg's `%s` (and doubles a literal `%`), once per distinct query.
- Upserts use `INSERT ... ON CONFLICT`, and ids come back with `RETURNING`, which
  both engines understand; booleans are passed as Python bools.
- Autoincrement, triggers and full-text search differ in the schema files
  (`mta/schema/postgresql/`, applied by `mta.db.pgschema`) and in the SQL store's
  search query.

Threads: every thread of the pools that call in gets its own connection (psycopg
connections are not meant to be shared by concurrent transactions), opened on first
use and kept; `close()` closes them all.  Connections run in autocommit mode and
transactions are explicit `BEGIN`/`COMMIT`, as with SQLite.  A write transaction
takes a transaction-scoped advisory lock first, so writers queue up as they do on
SQLite's single write lock and a read-modify-write (lockout counters) is never lost
between nodes.

Outages: when the server restarts or the network drops, the statement that finds
out raises `DatabaseUnavailable` (the caller turns it into 451/454 or keeps the
message queued) and the broken connection is dropped; the next call connects
again.  A connection that went stale while idle is noticed by the first statement
of a read or by `BEGIN`, which are retried once on a new connection, so the first
operation after a restart usually succeeds.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from mta.db.errors import DatabaseUnavailable
from mta.db.location import describe

# pg_advisory_xact_lock(class, key): "mta" as an int, and a key per purpose and schema
# (hashtext of the schema name), so installations in separate schemas never wait on
# each other.
LOCK_CLASS = 0x6D7461
_WRITE_LOCK = f"SELECT pg_advisory_xact_lock({LOCK_CLASS}, hashtext(current_schema() || '/write'))"
# libpq settings unless the dsn says otherwise: a server that vanishes without closing
# the connection (host down, network cut) is noticed within about a minute instead
# of the kernel's TCP timeouts, so a pool thread is not stuck for hours.
_CONNECTION_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}


@functools.lru_cache(maxsize=1024)
def pg_sql(sql: str, with_params: bool = True) -> str:
    """`sql` with SQLite's `?` placeholders as psycopg's `%s`.

    `?` inside quoted strings or identifiers is left alone.  With parameters,
    psycopg reads every `%` as the start of a placeholder, so a literal one is
    doubled.
    """
    out = []
    quote = ""
    for ch in sql:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "?" and with_params:
            out.append("%s")
            continue
        if ch == "%" and with_params:
            out.append("%%")
            continue
        out.append(ch)
    return "".join(out)


class Session:
    """What the table mixins call `conn`: `execute`/`executemany` with `?`
    placeholders on this thread's connection, driver errors that mean "the server
    is gone" raised as `DatabaseUnavailable`.

    `retry` (reads outside a transaction only): the first statement is sent again
    on a new connection when the old one turns out to be broken.
    """

    def __init__(self, engine: PostgresEngine, conn: Any, *, retry: bool = False):
        self._engine = engine
        self.raw = conn
        self._retry = retry

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        query = pg_sql(sql, params is not None)
        try:
            return self.raw.execute(query, params)
        except self._engine.driver.OperationalError as e:
            if not self.raw.broken:
                raise
            self._engine.discard(self.raw)
            if not self._retry:
                raise self._engine.unavailable(e) from e
            self._retry = False
            self.raw = self._engine.connection()
            try:
                return self.raw.execute(query, params)
            except self._engine.driver.OperationalError as again:
                if self.raw.broken:
                    self._engine.discard(self.raw)
                    raise self._engine.unavailable(again) from again
                raise
        finally:
            self._retry = False

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> Any:
        cursor = self.raw.cursor()
        try:
            cursor.executemany(pg_sql(sql), seq)
        except self._engine.driver.OperationalError as e:
            if self.raw.broken:
                self._engine.discard(self.raw)
                raise self._engine.unavailable(e) from e
            raise
        return cursor

    @property
    def in_transaction(self) -> bool:
        return self._engine.in_transaction(self.raw)


class PostgresEngine:
    """Connections to the database named by `dsn`, one per calling thread."""

    dialect = "postgresql"

    def __init__(self, dsn: str, *, timeout: float = 10.0, application_name: str = "mta"):
        import psycopg

        self.driver = psycopg
        self.path = dsn  # what error messages and the SQLite engine call it
        self.dsn = dsn
        self._timeout = timeout
        self._application_name = application_name
        self._local = threading.local()
        self._open: set[Any] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._versions = itertools.count(1)
        self.connection()  # fail now, with a clear message, when it cannot connect

    # -- connections ---------------------------------------------------------------

    def unavailable(self, error: BaseException) -> DatabaseUnavailable:
        reason = str(error).strip().splitlines()
        detail = reason[0] if reason else type(error).__name__
        return DatabaseUnavailable(f"PostgreSQL at {describe(self.dsn)} is unavailable: {detail}")

    def connection(self) -> Any:
        """This thread's connection, (re)connected when missing or broken."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not (conn.closed or conn.broken):
            return conn
        if conn is not None:
            self.discard(conn)
        if self._closed:
            raise DatabaseUnavailable(f"{describe(self.dsn)}: the database was closed")
        given = self.driver.conninfo.conninfo_to_dict(self.dsn)
        settings = {
            "connect_timeout": str(max(1, int(self._timeout))),
            "application_name": self._application_name,
            **_CONNECTION_DEFAULTS,
        }
        try:
            conn = self.driver.connect(
                self.dsn,
                autocommit=True,
                **{k: v for k, v in settings.items() if k not in given},
            )
        except self.driver.OperationalError as e:
            raise self.unavailable(e) from e
        with self._lock:
            self._open.add(conn)
        self._local.conn = conn
        return conn

    def discard(self, conn: Any) -> None:
        """Forget (and close) a connection that broke."""
        with self._lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with contextlib.suppress(Exception):
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (the service tree's shutdown)."""
        with self._lock:
            self._closed = True
            conns, self._open = list(self._open), set()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()

    def in_transaction(self, conn: Any) -> bool:
        return conn.info.transaction_status != self.driver.pq.TransactionStatus.IDLE

    def _begin(self, statement: str) -> Any:
        """This thread's connection with `statement` (a BEGIN) executed on it;
        retried once on a new connection when the old one went stale."""
        conn = self.connection()
        try:
            conn.execute(statement)
            return conn
        except self.driver.OperationalError:
            if not conn.broken:
                raise
            self.discard(conn)
        conn = self.connection()
        try:
            conn.execute(statement)
        except self.driver.OperationalError as e:
            if conn.broken:
                self.discard(conn)
                raise self.unavailable(e) from e
            raise
        return conn

    # -- the API the table mixins use -------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Session]:
        """A write transaction; nested uses join the outermost one.

        `exclusive` (the default, for the directory tables) queues writers behind
        one advisory lock, as SQLite's `BEGIN IMMEDIATE` does; the mail store
        passes False, its deliveries never read-modify-write shared rows.
        """
        conn = self.connection()
        if self.in_transaction(conn):
            yield Session(self, conn)
            return
        conn = self._begin(f"BEGIN; {_WRITE_LOCK}" if exclusive else "BEGIN")
        session = Session(self, conn)
        try:
            yield session
        except BaseException:
            self._end(conn, "ROLLBACK", quiet=True)
            raise
        self._end(conn, "COMMIT")

    def _end(self, conn: Any, statement: str, *, quiet: bool = False) -> None:
        if conn.broken or conn.closed:
            self.discard(conn)
            if quiet:
                return
            raise DatabaseUnavailable(
                f"PostgreSQL at {describe(self.dsn)}: connection lost before {statement}"
            )
        try:
            conn.execute(statement)
        except self.driver.OperationalError as e:
            if not conn.broken:
                raise
            self.discard(conn)
            if not quiet:
                # COMMIT sent, answer lost: the outcome is unknown, as for any client.
                raise self.unavailable(e) from e
        except Exception:
            if not quiet:
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        conn = self.connection()
        yield Session(self, conn, retry=not self.in_transaction(conn))

    @contextlib.contextmanager
    def consistent_read(self) -> Iterator[Session]:
        """Several SELECTs that see one snapshot (a read-only repeatable-read
        transaction: it takes no locks)."""
        conn = self.connection()
        if self.in_transaction(conn):
            yield Session(self, conn)
            return
        conn = self._begin("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield Session(self, conn)
        finally:
            self._end(conn, "ROLLBACK", quiet=True)

    def data_version(self) -> int:
        """A new number at every call.  PostgreSQL has no cheap "anything was
        committed" counter like SQLite's, so the directory takes every tick as a
        possible change: it compares the generation counter (one query) and reads
        quota usage afresh, as it does on SQLite whenever mail was delivered."""
        return next(self._versions)

    def ping(self) -> str:
        with self.read() as conn:
            conn.execute("SELECT 1").fetchone()
        return "reachable"
