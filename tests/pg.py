"""The real PostgreSQL the tests use (127.0.0.1:5432, trust auth; .ci/run makes
sure one runs), and a fresh database per test so tests never see each other's rows.

`MTA_TEST_POSTGRES` overrides the server's admin URI.  Without a server (or without
psycopg) a test fails under CI=true and is skipped elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import urllib.parse
from collections.abc import Iterator

import pytest

ADMIN_DSN = os.environ.get("MTA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(reason: str) -> None:
    reason = f"PostgreSQL is not available at {ADMIN_DSN}: {reason} (.ci/run starts one)"
    print(reason)
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def admin_connection():
    """An autocommit connection to the admin database; fails or skips without one."""
    try:
        import psycopg
    except ImportError as e:
        _unavailable(f"psycopg is not installed ({e})")
    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        _unavailable(str(e).strip().splitlines()[0])


def dsn_for(database: str) -> str:
    parts = urllib.parse.urlsplit(ADMIN_DSN)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@contextlib.contextmanager
def fresh_database(prefix: str = "test_mta") -> Iterator[str]:
    """A new, empty database for one test (dropped after it, connections and all);
    yields its URI."""
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    with admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield dsn_for(name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
