"""PostgreSQL restarted under load: a node on the PostgreSQL queue answers 451 while
it is gone, loses nothing it acknowledged, and resumes by itself.

The server restarted is a private throw-away cluster (initdb into tmp_path, its own
port), never the machine's shared one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.test_crash import _tags
from tests.e2e.test_pg_cluster import _sender

pytestmark = pytest.mark.e2e


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    path = found[-1]
    if not path:
        reason = f"PostgreSQL's {name} is not installed (Debian package postgresql)"
        print(reason)
        if os.environ.get("CI"):
            pytest.fail(f"CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


class PrivatePostgres:
    """initdb + pg_ctl on a free loopback port (as user postgres when we are root)."""

    def __init__(self):
        # Not under tmp_path: user postgres must be able to reach it.
        self.root = Path(tempfile.mkdtemp(prefix="mta-test-pg-"))
        root = self.root
        self.data = root / "data"
        self.port = free_port()
        self.pg_ctl = _pg_bin("pg_ctl")
        self.initdb = _pg_bin("initdb")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {done.stdout}{done.stderr}")

    def start(self) -> str:
        self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._ctl("start")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, action: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w",
            "-t", "60", "-m", "fast", "-o", options, action,
        )  # fmt: skip

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        try:
            self._ctl("stop")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.mark.slow
def test_postgresql_restarted_under_load(mta_server_factory, tmp_path):
    pg = PrivatePostgres()
    dsn = pg.start()
    try:
        node = mta_server_factory(
            {
                "queue": {"backend": "postgresql", "lease": 5.0, "retry_schedule": [1.0]},
                "database": {"dsn": dsn},
            }
        )
        acked: list[str] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=_sender, args=([node], w, acked, stop), daemon=True)
            for w in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while len(acked) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(acked)
        pg.restart()
        while len(acked) < before + 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(15)
        assert len(acked) >= before + 100, "service did not resume after the restart"

        maildir = node.maildir("postmaster@localhost")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not set(acked) <= set(_tags(maildir)):
            time.sleep(0.2)
        delivered = _tags(maildir)
        missing = set(acked) - set(delivered)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        duplicates = sorted({t for t in delivered if delivered.count(t) > 1})
        assert not duplicates, f"delivered twice: {duplicates[:5]}"
        health = node.admin("queue", "list")
        assert health.returncode == 0, health.stderr
        node.stop()
    finally:
        pg.stop()
