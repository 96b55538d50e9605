"""The schema of `mta.db`: versioned SQL files in `mta/schema/`, applied in order.

`NNN_name.sql` files ship as package data (`setup.cfg`: `mta = schema/*.sql`) and are
read with `importlib.resources`, so they are found in a checkout, a wheel or the
Debian package alike.  The version applied last is `PRAGMA user_version`; each file
runs in one transaction with its version bump, so a failed migration leaves nothing.
"""

from __future__ import annotations

import importlib.resources
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import attrs

from mta.db.errors import SchemaError

_MIGRATION_NAME = re.compile(r"(\d+)_[A-Za-z0-9_.-]*\.sql\Z")


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(package: str = "mta", folder: str = "schema") -> list[Migration]:
    """The numbered SQL files shipped in `mta/schema/`, in order."""
    found = []
    for entry in importlib.resources.files(package).joinpath(folder).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise SchemaError(f"schema files must be numbered 1, 2, 3...: found {migration.name}")
    return found


def split_sql(script: str) -> Iterator[str]:
    """Split a script into statements (CREATE TRIGGER bodies included).

    `executescript` would commit on its own, and a migration must run in the same
    transaction as its `user_version` bump, so statements are executed one by one.
    """
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if any(line.strip() and not line.strip().startswith("--") for line in pending.splitlines()):
        raise SchemaError(f"incomplete SQL statement: {pending.strip()[:60]!r}")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(
    path: str,
    read: Callable[[], AbstractContextManager[sqlite3.Connection]],
    transaction: Callable[[], AbstractContextManager[sqlite3.Connection]],
    migrations: Sequence[Migration],
) -> list[Migration]:
    """Bring the file at `path` to the last of `migrations`; `read()` and
    `transaction()` are the database's own context managers.  Refuses a file whose
    version is newer than this mta knows.  Returns the migrations applied here."""
    done = []
    for migration in migrations:
        with read() as conn:
            if migration.version <= schema_version(conn):
                continue
        # Re-read inside the write lock: the daemon and mta-admin may race here.
        with transaction() as conn:
            current = schema_version(conn)
            if migration.version <= current:
                continue
            if migration.version != current + 1:
                raise SchemaError(f"{path}: cannot apply {migration.name} to version {current}")
            for statement in split_sql(migration.sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(migration.version)}")
            done.append(migration)
    latest = migrations[-1].version if migrations else 0
    with read() as conn:
        version = schema_version(conn)
    if version > latest:
        raise SchemaError(
            f"{path}: schema version {version} is newer than this "
            f"mta understands ({latest}); upgrade mta"
        )
    return done
