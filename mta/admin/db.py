"""``mta-admin db migrate|status|reindex``: the database schema, SQLite or PostgreSQL,
and SQLite's full-text search index of stored mail.

`migrate` applies the schema files this mta ships and the database lacks (SQLite:
``mta/schema/NNN_*.sql`` up to ``PRAGMA user_version``; PostgreSQL:
``mta/schema/postgresql/NNN_*.sql`` recorded in ``schema_migrations``), each in its
own transaction.  Several nodes running it at once are safe: on PostgreSQL an
advisory lock lets one migrate while the others wait and then find nothing to do;
SQLite's write lock does the same.  It is what ``[database] migrate = "manual"``
asks the operator to run before starting a new version; with "auto" (the default)
the daemon does it at start.  `status` lists every file, applied or pending.

`reindex` rebuilds ``messages_fts`` from the messages (`--check` only compares
them).  The index keeps tokens, not text, and deleting a message gives it the
message's words again, parsed anew: when they are no longer those it was indexed
under (another Python parses differently), the delete is refused, naming this
command (`mta.storage.messagedb`).  On PostgreSQL each row carries its own
``search_vector``: there is nothing to rebuild.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.admin.common import CLIError, config_of, table
from mta.db.connection import default_migrations, migrate_engine, open_engine, schema_version_of
from mta.db.errors import SchemaError
from mta.db.location import database_location, describe
from mta.storage.messagedb import MessageDB, check_search_index, reindex


def add_commands(commands: Any, leaf: Any) -> None:
    group = commands.add_parser("db", help="database schema").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    migrate = leaf(group, "migrate", cmd_migrate, "apply the schema migrations this mta ships")
    migrate.add_argument("--dry-run", action="store_true", help="only list what would be applied")
    leaf(group, "status", cmd_status, "list the schema migrations, applied or pending")
    reindex = leaf(group, "reindex", cmd_reindex, "rebuild the full-text search index of mail")
    reindex.add_argument(
        "--check", action="store_true", help="only check the index against the messages"
    )


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


def cmd_reindex(args: argparse.Namespace) -> int:
    location = database_location(config_of(args))
    try:
        db = MessageDB(location, clock=time.time, migrate=False)
    except SchemaError as e:
        raise CLIError(str(e)) from None
    try:
        if db.dialect != "sqlite":
            print(f"{describe(location)}: each message carries its own search words; nothing to do")
            return 0
        if args.check:
            wrong = check_search_index(db)
            if wrong is None:
                print(f"{describe(location)}: the search index matches the messages")
                return 0
            print(f"{describe(location)}: {wrong} (mta-admin db reindex puts it right)")
            return 1
        count = reindex(db)
    finally:
        db.close()
    print(f"{describe(location)}: search index rebuilt ({count} messages)")
    return 0
