"""The user/alias database: one SQLite file, `<datadir>/mta.db`, or PostgreSQL
(`[database] dsn`), and its schema.

This package owns the schema (versioned SQL files: `mta/schema/` for SQLite, the
version kept in `PRAGMA user_version`, `mta.db.schema`; `mta/schema/postgresql/`,
recorded in `schema_migrations`, `mta.db.pgschema`) and a small *blocking* API over
it, `Database`, one mixin per table: `users`, `aliases`, `lockouts`
(auth_failures), `audit`, over one engine per dialect (`mta.db.sqlite`,
`mta.db.postgres`, chosen by the location string: `mta.db.location`).  Two kinds
of callers share the database: `mta-admin` (a separate short-lived process) and the
running daemon, which calls in only from a thread pool (`mta.db.directory`), never
on the reactor.  SQLite's WAL mode lets the daemon keep reading while the CLI writes.

Addresses are validated and canonicalised in `mta.db.addresses` so that every writer
stores the same form: see `address_key`.  Everything public is re-exported here;
import it from `mta.db`.
"""

from mta.db.addresses import (
    address_key,
    alias_source,
    alias_target,
    fold,
    lookup_key,
    mailbox_address,
)
from mta.db.aliases import Snapshot
from mta.db.audit import AuditEntry
from mta.db.connection import match_owner
from mta.db.database import Database, DatabaseHandle
from mta.db.errors import (
    AliasExists,
    DatabaseUnavailable,
    DirectoryError,
    InvalidAddress,
    NoSuchAlias,
    NoSuchUser,
    SchemaError,
    UserExists,
    database_errors,
)
from mta.db.location import auto_migrate, database_location, describe, is_postgres
from mta.db.lockouts import IP_PREFIX, AuthFailure, same_client
from mta.db.schema import Migration, load_migrations, split_sql
from mta.db.users import MIB, User, quota_bytes

__all__ = [
    "IP_PREFIX",
    "MIB",
    "AliasExists",
    "AuditEntry",
    "AuthFailure",
    "Database",
    "DatabaseHandle",
    "DatabaseUnavailable",
    "DirectoryError",
    "InvalidAddress",
    "Migration",
    "NoSuchAlias",
    "NoSuchUser",
    "SchemaError",
    "Snapshot",
    "User",
    "UserExists",
    "address_key",
    "alias_source",
    "alias_target",
    "auto_migrate",
    "database_errors",
    "database_location",
    "describe",
    "fold",
    "is_postgres",
    "load_migrations",
    "lookup_key",
    "mailbox_address",
    "quota_bytes",
    "match_owner",
    "same_client",
    "split_sql",
]
