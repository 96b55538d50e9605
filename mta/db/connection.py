"""One connection to the database: the engine, its transactions, its change counters.

`Connection` is the base every table mixin of `mta.db.Database` builds on.  Its
location (`mta.db.location`) picks the engine: the SQLite file (`mta.db.sqlite`,
the default, `<datadir>/mta.db`) or PostgreSQL (`mta.db.postgres`, a
`postgresql://` dsn).  Both hand out `transaction()` for writes and `_read()` /
`_consistent_read()` for reads, whose `conn.execute(sql, params)` takes SQLite's
`?` placeholders, and both are brought to the current schema on open (or, with
`migrate=False`, refuse to work on a schema that is behind).  Every method blocks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

from mta.db.errors import SchemaError
from mta.db.location import describe, is_postgres
from mta.db.schema import Migration, load_migrations
from mta.db.sqlite import SQLiteEngine, match_owner

__all__ = [
    "Connection",
    "default_migrations",
    "match_owner",
    "migrate_engine",
    "open_engine",
    "schema_version_of",
]


def open_engine(location: str, *, timeout: float = 10.0) -> Any:
    """The engine for `location`: a `postgresql://` dsn or an SQLite file path."""
    if is_postgres(location):
        from mta.db.postgres import PostgresEngine

        return PostgresEngine(location, timeout=timeout)
    return SQLiteEngine(location, timeout=timeout)


def migrate_engine(engine: Any, migrations: Sequence[Migration], *, apply: bool) -> list[Migration]:
    """Apply the `migrations` that `engine`'s database lacks (none with `apply`
    False); returns them.  Raises `SchemaError` for a schema newer than this mta."""
    if engine.dialect == "postgresql":
        from mta.db.pgschema import migrate

        return migrate(engine, migrations, apply=apply)
    return engine.migrate(migrations, apply=apply)


def schema_version_of(engine: Any) -> int:
    """The last migration applied (PostgreSQL: the highest number recorded)."""
    if engine.dialect == "postgresql":
        from mta.db.pgschema import applied_versions

        return max(applied_versions(engine), default=0)
    return engine.schema_version()


def default_migrations(location: str) -> list[Migration]:
    """The schema files this mta ships for the engine of `location`."""
    if is_postgres(location):
        from mta.db.pgschema import load_pg_migrations

        return load_pg_migrations()
    return load_migrations()


class Connection:
    """A connection to the database at `location`, migrated to the current schema
    on open (`migrate=True`), or checked against it (`migrate=False`: a schema
    that is behind raises `SchemaError` naming `mta-admin db migrate`).

    `clock` supplies timestamps, so tests control them.
    """

    def __init__(
        self,
        location: str,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] | None = None,
        timeout: float = 10.0,
        migrate: bool = True,
    ):
        self.path = location
        self._clock = clock
        self._engine = open_engine(location, timeout=timeout)
        self.dialect: str = self._engine.dialect
        try:
            if migrations is None:
                migrations = default_migrations(location)
            pending = migrate_engine(self._engine, migrations, apply=migrate)
            if pending and not migrate:
                raise SchemaError(
                    f"{describe(location)}: the database schema is behind this mta "
                    f"(missing {', '.join(m.name for m in pending)}); run `mta-admin db migrate` "
                    '(or set [database] migrate = "auto")'
                )
        except BaseException:
            self._engine.close()
            raise

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self, *, exclusive: bool = True) -> contextlib.AbstractContextManager[Any]:
        """A write transaction; nested uses join the outermost one.

        The CLI wraps a change and its audit row in one, so neither exists alone.
        """
        return self._engine.transaction(exclusive=exclusive)

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        return self._engine.read()

    def _consistent_read(self) -> contextlib.AbstractContextManager[Any]:
        """Several SELECTs that see one state of the database."""
        return self._engine.consistent_read()

    def relax_durability(self) -> None:
        """Commits on this connection survive the process being killed but not a
        power loss (SQLite ``synchronous=NORMAL`` in WAL mode: no fsync per commit).
        For counters that can be recomputed (`mta.storage.quota`'s usage), never for
        what an operator or a client was told is stored.  PostgreSQL: unchanged."""
        if self.dialect == "sqlite":
            with self._read() as conn:
                conn.execute("PRAGMA synchronous=NORMAL")

    @property
    def schema_version(self) -> int:
        return schema_version_of(self._engine)

    def data_version(self) -> int:
        """Changes whenever another connection commits a change the directory
        cares about (SQLite: any commit; PostgreSQL: users and aliases)."""
        return self._engine.data_version()

    def ping(self) -> str:
        """A query answered ("reachable"), or the error saying why not."""
        return self._engine.ping()
