"""A private PostgreSQL database per test module, for the PostgreSQL queue's tests.

PostgreSQL runs at 127.0.0.1:5432 (trust) on this machine kind, and .ci/run starts
one where none runs: under CI=true an unreachable server FAILS the test; elsewhere
the test is skipped with the reason printed.  `MTA_TEST_PG` overrides the server's
DSN (its database is only used to create and drop ``test_pgq_<random>``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

ADMIN_DSN = os.environ.get("MTA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(reason: str):
    print(reason)
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def private_database(prefix: str = "test_pgq") -> Iterator[str]:
    """The DSN of a new, empty database, dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg (PyPI psycopg, Debian python3-psycopg) is not installed")
    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        _unavailable(f"PostgreSQL at {ADMIN_DSN} is unreachable: {str(e).strip()}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def terminate_backends(dsn: str) -> int:
    """pg_terminate_backend every other session on `dsn`'s database: how many."""
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dsn.rsplit("/", 1)[1],),
        ).fetchall()
    return len(rows)
