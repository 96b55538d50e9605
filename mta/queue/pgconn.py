"""Connections to the PostgreSQL queue: a small blocking pool, one clear error type.

The queue's SQL runs on a bounded thread pool (`deferToThreadPool`), each job on a
connection taken from `Connections` and given back afterwards.  A connection that
fails (PostgreSQL restarted, the backend terminated, the network gone) is closed
and forgotten, and the job fails with `QueueUnavailable`, whose message says what
happened and where: the session turns it into a 451, the runner retries later.
The next job opens a fresh connection, so service resumes by itself once
PostgreSQL is back; nothing here retries a write whose outcome is unknown.
"""

from __future__ import annotations

import os
import queue
import secrets
import socket
import threading
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

T = TypeVar("T")


class QueueUnavailable(RuntimeError):
    """The PostgreSQL queue cannot be reached or failed mid-operation."""


def _psycopg():
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a packaging error, said clearly
        raise QueueUnavailable(
            '[queue] backend = "postgresql" needs psycopg 3 (pip install psycopg,'
            " or apt-get install python3-psycopg)"
        ) from None
    return psycopg


def describe_dsn(dsn: str) -> str:
    """`dsn` without its password, for messages and logs."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "the configured [database] dsn"
    host = parts.get("host", "localhost")
    port = parts.get("port", "5432")
    return f"postgresql://{host}:{port}/{parts.get('dbname', '')}"


def node_id(hostname: str) -> str:
    """This process's lease owner name: configured hostname, pid, random instance."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


class Connections:
    """At most `size` open connections to `dsn`, each used by one thread at a time.

    `run(job, *args)` calls ``job(conn, *args)`` inside a transaction (committed when
    `job` returns) and returns its result.  Blocking: call it from a pool thread."""

    def __init__(self, dsn: str, size: int = 4, *, connect_timeout: int = 5):
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self._timeout = connect_timeout
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max(1, size))
        self._lock = threading.Lock()
        self._open: set = set()
        self._closed = False

    def connect(self, *, autocommit: bool = False):
        """A new connection (the caller owns it).  Raises QueueUnavailable."""
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.dsn, autocommit=autocommit, connect_timeout=self._timeout)
        except psycopg.Error as e:
            raise QueueUnavailable(
                f"PostgreSQL queue at {self.where} is unreachable: {_first_line(e)}"
            ) from None

    def run(self, job: Callable[..., T], *args) -> T:
        psycopg = _psycopg()
        with self._slots:
            conn = self._take()
            try:
                with conn.transaction():
                    result = job(conn, *args)
            except psycopg.OperationalError as e:
                self._discard(conn)
                raise QueueUnavailable(
                    f"PostgreSQL queue at {self.where} failed: {_first_line(e)}"
                ) from None
            except BaseException:
                if conn.closed or conn.broken:
                    self._discard(conn)
                else:
                    self._idle.put(conn)
                raise
            self._idle.put(conn)
            return result

    def _take(self):
        if self._closed:
            raise QueueUnavailable("the PostgreSQL queue is closed (the server is stopping)")
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if not conn.closed and not conn.broken:
                return conn
            self._discard(conn)
        conn = self.connect()
        with self._lock:
            self._open.add(conn)
        return conn

    def _discard(self, conn) -> None:
        with self._lock:
            self._open.discard(conn)
        try:
            conn.close()
        except Exception:
            pass

    def close(self) -> None:
        """Close every connection (the store stops); later jobs fail clearly."""
        self._closed = True
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# -- schema --------------------------------------------------------------------------


def schema_files() -> list[tuple[str, str]]:
    """(name, SQL) of this package's migrations, mta/schema/postgresql/1NN_*.sql."""
    folder = resources.files("mta").joinpath("schema").joinpath("postgresql")
    names = sorted(
        p.name for p in folder.iterdir() if p.name.endswith(".sql") and p.name[:1] == "1"
    )
    return [(name, folder.joinpath(name).read_text("utf-8")) for name in names]


def apply_queue_schema(conn) -> None:
    """Create the queue tables (idempotent: every statement is IF NOT EXISTS).

    The migration runner (`mta.db.pgschema`: `mta-admin db migrate`, and every
    start with `[database] migrate = "auto"`) applies the same 1NN_*.sql files and
    records them; the store applies them too, because `[queue] dsn` may name
    another database than `[database] dsn`.  Under an advisory lock, so nodes
    starting together do not race; every statement is IF NOT EXISTS, so running
    after the runner (or before it) changes nothing."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7263815)")
        for _, sql in schema_files():
            conn.execute(sql)
