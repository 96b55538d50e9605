"""End to end: the real OpenSSH client logs into a real `twistd mta`'s manhole with a
key, runs Python and reads the answer; a wrong key is refused; the login is audited."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess

import pytest

from tests.conftest import free_port, require_tool

pytestmark = pytest.mark.e2e


def keygen(path) -> None:
    ssh_keygen = require_tool("ssh-keygen")
    subprocess.run(
        [ssh_keygen, "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(path)], check=True
    )


@pytest.fixture
def manhole(mta_server_factory, tmp_path):
    keygen(tmp_path / "good")
    keygen(tmp_path / "wrong")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text("# operators\n" + (tmp_path / "good.pub").read_text())
    port = free_port()
    server = mta_server_factory(
        {"manhole": {"address": f"127.0.0.1:{port}", "authorized_keys": str(authorized)}}
    )
    return server, port, tmp_path


def ssh(port: int, key, command: str, *extra: str, input: str | None = None):
    client = require_tool("ssh")
    return subprocess.run(
        [
            client,
            "-i", str(key),
            "-p", str(port),
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=20",
            "-F", "/dev/null",
            *extra,
            "mta@127.0.0.1",
            command,
        ],
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def audit_rows(server) -> list[tuple]:
    conn = sqlite3.connect(server.datadir / "mta.db")
    try:
        return conn.execute(
            "SELECT username, action, ip_address, success, details FROM audit_log"
            " WHERE action = 'manhole.login'"
        ).fetchall()
    finally:
        conn.close()


def test_command_runs_in_the_live_server(manhole):
    server, port, keys = manhole
    out = ssh(port, keys / "good", "config.hostname, queue()['depth'], len(sessions()), 6 * 7")
    assert out.returncode == 0, out.stderr
    assert "'mx.example.test'" in out.stdout
    assert "'deferred': 0" in out.stdout
    assert "42" in out.stdout

    stats = ssh(port, keys / "good", "stats()['smtp_messages_received_total']")
    assert stats.returncode == 0 and stats.stdout.strip() == "0.0", stats

    failed = ssh(port, keys / "good", "1/0")
    assert failed.returncode == 1
    assert "ZeroDivisionError" in failed.stderr

    host_key = server.datadir / "manhole" / "ssh_host_key"
    assert stat.S_IMODE(os.stat(host_key).st_mode) == 0o600

    rows = audit_rows(server)
    assert len(rows) == 3
    username, action, ip, success, details = rows[0]
    assert (username, action, ip, success) == ("mta", "manhole.login", "127.0.0.1", 1)
    assert '"key": "' in details


def test_wrong_key_is_refused_and_not_audited(manhole):
    server, port, keys = manhole
    out = ssh(port, keys / "wrong", "1")
    assert out.returncode == 255
    assert "Permission denied (publickey)" in out.stderr
    assert audit_rows(server) == []
    # No password prompt is ever offered.
    out = ssh(port, keys / "wrong", "1", "-o", "PreferredAuthentications=password")
    assert out.returncode == 255
    assert audit_rows(server) == []


def test_interactive_shell_over_a_pty(manhole):
    server, port, keys = manhole
    out = ssh(port, keys / "good", "", "-tt", input="print(6 * 7 + 1)\n\x04")
    assert "43" in out.stdout, (out.stdout, out.stderr)
    assert len(audit_rows(server)) == 1
