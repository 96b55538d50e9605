"""The exceptions of `mta.db`: operator mistakes, and a file this mta cannot use."""

from __future__ import annotations


class DirectoryError(Exception):
    """A mistake an operator can make (unknown user, duplicate, bad address).

    str() is a one-line message fit to print as is; the CLI never shows a traceback
    for these.
    """


class InvalidAddress(DirectoryError):
    pass


class UserExists(DirectoryError):
    pass


class NoSuchUser(DirectoryError):
    pass


class AliasExists(DirectoryError):
    pass


class NoSuchAlias(DirectoryError):
    pass


class SchemaError(Exception):
    """The database file cannot be used by this version of mta."""


class DatabaseUnavailable(Exception):
    """The database server cannot be reached now (PostgreSQL down, restarting, or
    the connection was cut): a temporary condition.  The operation that saw it
    failed and was not applied; the next one connects again."""


def database_errors() -> tuple[type[BaseException], ...]:
    """The exception classes a database call may raise beyond ours, for `except`
    clauses: sqlite3's, and psycopg's once the PostgreSQL driver was loaded (it is
    imported only when a dsn names PostgreSQL, so nothing else can raise them)."""
    import sqlite3
    import sys

    found: tuple[type[BaseException], ...] = (sqlite3.Error, DatabaseUnavailable)
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None:
        found += (psycopg.Error,)
    return found
