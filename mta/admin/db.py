"""``mta-admin db migrate|status``: the database schema, SQLite or PostgreSQL.

`migrate` applies the schema files this mta ships and the database lacks (SQLite:
``mta/schema/NNN_*.sql`` up to ``PRAGMA user_version``; PostgreSQL:
``mta/schema/postgresql/NNN_*.sql`` recorded in ``schema_migrations``), each in its
own transaction.  Several nodes running it at once are safe: on PostgreSQL an
advisory lock lets one migrate while the others wait and then find nothing to do;
SQLite's write lock does the same.  It is what ``[database] migrate = "manual"``
asks the operator to run before starting a new version; with "auto" (the default)
the daemon does it at start.  `status` lists every file, applied or pending.
"""

from __future__ import annotations

import argparse
from typing import Any

from mta.admin.common import config_of, table
from mta.db.connection import default_migrations, migrate_engine, open_engine, schema_version_of
from mta.db.location import database_location, describe


def add_commands(commands: Any, leaf: Any) -> None:
    group = commands.add_parser("db", help="database schema").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    migrate = leaf(group, "migrate", cmd_migrate, "apply the schema migrations this mta ships")
    migrate.add_argument("--dry-run", action="store_true", help="only list what would be applied")
    leaf(group, "status", cmd_status, "list the schema migrations, applied or pending")


def cmd_migrate(args: argparse.Namespace) -> int:
    location = database_location(config_of(args))
    engine = open_engine(location)
    try:
        pending = migrate_engine(engine, default_migrations(location), apply=not args.dry_run)
        version = schema_version_of(engine)
    finally:
        engine.close()
    verb = "would apply" if args.dry_run else "applied"
    for migration in pending:
        print(f"{verb} {migration.name}")
    if not pending:
        print(f"{describe(location)}: schema up to date (version {version})")
    elif not args.dry_run:
        print(f"{describe(location)}: schema at version {version}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    location = database_location(config_of(args))
    migrations = default_migrations(location)
    engine = open_engine(location)
    try:
        pending = {m.version for m in migrate_engine(engine, migrations, apply=False)}
    finally:
        engine.close()
    print(f"database: {describe(location)} ({engine.dialect})")
    rows = [
        (f"{m.version:03d}", m.name, "pending" if m.version in pending else "applied")
        for m in migrations
    ]
    print(table(("VERSION", "FILE", "STATE"), rows))
    return 0
