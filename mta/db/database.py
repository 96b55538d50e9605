"""`Database`: one connection to the database with every table's methods, and
`DatabaseHandle`, which opens it on first use in a pool thread."""

from __future__ import annotations

import threading

from mta.db.aliases import AliasTable
from mta.db.audit import AuditTable
from mta.db.lockouts import LockoutTable
from mta.db.ratelimits import RateBucketTable
from mta.db.users import UserTable


class Database(UserTable, AliasTable, LockoutTable, AuditTable, RateBucketTable):
    """A connection to the database (the SQLite file, or PostgreSQL for a
    `postgresql://` location), migrated to the current schema on open.

    Every method blocks; the object may be shared between threads (SQLite: one
    connection, serialised by a lock; PostgreSQL: one connection per thread).  `clock` supplies timestamps, so tests control them.
    The methods come from one mixin per table (`mta.db.users`, `.aliases`,
    `.lockouts`, `.audit`, `.ratelimits`) over `mta.db.connection.Connection`.
    """


class DatabaseHandle:
    """A `Database` opened on first use, from whichever pool thread asks first.

    Components that run their queries in a thread pool take this callable instead
    of an open database, so nothing touches SQLite on the reactor thread and one
    connection serves them all.  `close()` belongs to the service tree's shutdown.
    `opener(path, migrate=...)` makes the connection (a `Connection` subclass of a
    store's own, for one that keeps more tables than `Database` knows).
    """

    def __init__(self, path: str, *, migrate: bool = True, durable: bool = True, opener=None):
        self.path = path
        self._migrate = migrate
        self._durable = durable  # False: `Database.relax_durability` once opened
        self._opener = opener or Database
        self._db: Database | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Database:
        db = self._db
        if db is None:
            with self._lock:
                if self._db is None:
                    db = self._opener(self.path, migrate=self._migrate)
                    if not self._durable:
                        db.relax_durability()
                    self._db = db
                db = self._db
        return db

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()
