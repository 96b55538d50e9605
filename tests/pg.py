"""The real PostgreSQL the tests use (127.0.0.1:5432, trust auth; .ci/run makes
sure one runs), and a fresh database per test so tests never see each other's rows.

`MTA_TEST_POSTGRES` overrides the server's admin URI.  Without a server (or without
psycopg) a test fails under CI=true and is skipped elsewhere, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shlex
import subprocess
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


class PrivateCluster:
    """A PostgreSQL server of the test's own (initdb, then pg_ctl as user postgres)
    on a free port: for tests that stop and restart the server, which the shared
    one must never be.  Trust authentication, loopback only, fsync off."""

    def __init__(self) -> None:
        import pwd
        import shutil
        import tempfile

        from tests.conftest import free_port

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not bins:
            _unavailable("no /usr/lib/postgresql/*/bin/pg_ctl to run a private server")
        if os.geteuid() != 0:
            _unavailable("a private server needs root (to run initdb as user postgres)")
        self.bin = os.path.dirname(bins[-1])
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="mta-test-pg-")
        self._rmtree = shutil.rmtree
        owner = pwd.getpwnam("postgres")
        os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = os.path.join(self.root, "data")
        self._as_postgres(
            "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, tool: str, *args: str) -> None:
        command = " ".join(shlex.quote(a) for a in (os.path.join(self.bin, tool), *args))
        subprocess.run(
            ["su", "postgres", "-s", "/bin/sh", "-c", command],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.root, "server.log")
        self._as_postgres(
            "pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        self._rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    """A started `PrivateCluster`, stopped and removed afterwards."""
    cluster = PrivateCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
