"""The PostgreSQL schema: versioned SQL files in `mta/schema/postgresql/`.

`NNN_name.sql` files ship as package data and are applied in numeric order; each
runs in one transaction together with its row in `schema_migrations` (version,
name, when), so a failed migration leaves nothing behind.  The numbers need not be
contiguous: 001-099 follow the SQLite files of `mta/schema/` (the same number
makes the same change), 100-199 are the queue's tables (`mta.queue`), and a file
missing from the table is applied even when a higher number already is (a
feature merged later).

Several nodes may start at once: the whole run holds a session-level advisory lock
(`pg_advisory_lock`), so one node migrates while the others wait and then find
nothing left to do.  A database that has a migration this mta does not ship was
migrated by a newer mta: it is refused, as SQLite's newer `user_version` is.
A file is sent as one script (no parameters: `%` is literal, `$$` bodies work);
statements that refuse a transaction (CREATE INDEX CONCURRENTLY) cannot be used.
"""

from __future__ import annotations

import importlib.resources
import re
import time
from collections.abc import Sequence
from typing import Any

from mta.db.errors import SchemaError
from mta.db.location import describe
from mta.db.postgres import LOCK_CLASS, PostgresEngine, Session
from mta.db.schema import Migration

FOLDER = "schema/postgresql"
_MIGRATION_NAME = re.compile(r"(\d+)_[A-Za-z0-9_.-]*\.sql\Z")
_LOCK_KEY = f"{LOCK_CLASS}, hashtext(current_schema() || '/migrate')"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


def load_pg_migrations(package: str = "mta", folder: str = FOLDER) -> list[Migration]:
    """Every `NNN_name.sql` of `mta/schema/postgresql/`, in numeric order."""
    found = []
    for entry in importlib.resources.files(package).joinpath(folder).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for before, after in zip(found, found[1:]):
        if before.version == after.version:
            raise SchemaError(
                f"two schema files share number {after.version}: {before.name}, {after.name}"
            )
    return found


def applied_versions(engine: PostgresEngine) -> dict[int, str]:
    """version -> file name of every migration recorded in the database."""
    with engine.read() as conn:
        if conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0] is None:
            return {}
        return dict(conn.execute("SELECT version, name FROM schema_migrations").fetchall())


def _check_not_newer(engine: PostgresEngine, applied: dict[int, str], known: set[int]) -> None:
    newer = sorted(v for v in applied if v not in known)
    if newer:
        names = ", ".join(applied[v] for v in newer)
        raise SchemaError(
            f"{describe(engine.dsn)}: the schema has migrations this mta does not know "
            f"({names}): it was migrated by a newer mta; upgrade mta"
        )


def migrate(
    engine: PostgresEngine,
    migrations: Sequence[Migration],
    *,
    apply: bool = True,
    clock=time.time,
) -> list[Migration]:
    """Apply what is missing (with `apply`); returns the migrations this call
    applied (without `apply`: the missing ones).  Raises `SchemaError` for a
    database migrated by a newer mta."""
    known = {m.version for m in migrations}
    applied = applied_versions(engine)
    _check_not_newer(engine, applied, known)
    pending = [m for m in migrations if m.version not in applied]
    if not apply or not pending:
        return pending
    conn = engine.connection()
    session = Session(engine, conn)
    session.execute(f"SELECT pg_advisory_lock({_LOCK_KEY})")
    done = []
    try:
        # Re-read under the lock: another node may have done the work meanwhile.
        session.execute(_CREATE_TABLE)
        applied = applied_versions(engine)
        _check_not_newer(engine, applied, known)
        for migration in migrations:
            if migration.version not in applied:
                _apply(engine, session, migration, clock())
                done.append(migration)
    finally:
        if not conn.broken and not conn.closed:
            session.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})")
    return done


def _apply(engine: PostgresEngine, session: Session, migration: Migration, now: float) -> None:
    conn: Any = session.raw
    conn.execute("BEGIN")
    try:
        conn.execute(migration.sql)  # no parameters: several statements, `%` as is
        session.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now),
        )
    except BaseException as e:
        if not conn.broken:
            conn.execute("ROLLBACK")
        if isinstance(e, engine.driver.Error) and not isinstance(e, engine.driver.OperationalError):
            raise SchemaError(f"{describe(engine.dsn)}: {migration.name} failed: {e}") from e
        raise
    conn.execute("COMMIT")
