"""`workers = 2`: two processes share the listeners; none outlives the parent."""

from __future__ import annotations

import os
import smtplib
import subprocess
import time

import pytest

from tests.e2e.test_receive import wait_for_files

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [
            p
            for p in alive
            if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()
        ]
        time.sleep(0.05)
    return alive


def _wait_both_started(server) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = _children(server.pid)
        if children and server.log().count("mta starting") >= 2 * server.starts:
            return children[0]
        time.sleep(0.05)
    raise AssertionError("worker 1 did not start:\n" + server.log()[-3000:])


def test_two_workers_accept_and_deliver_and_stop_together(mta_server_factory):
    server = mta_server_factory({"workers": 2})
    child = _wait_both_started(server)
    for i in range(40):
        with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
            client.sendmail(
                "s@remote.test", ["postmaster@localhost"], f"Subject: {i}\r\n\r\nx\r\n".encode()
            )
    files = wait_for_files(server.maildir("postmaster@localhost") / "new", 40)
    # Maildir names carry the delivering pid: the kernel spread connections over both
    # processes (all 40 on one has probability 2**-39).
    pids = {int(f.name.split(".")[1].split("P")[1].split("Q")[0]) for f in files}
    assert pids == {server.pid, child}
    server.stop()
    assert _wait_gone([child]) == []


def test_workers_exit_when_the_parent_is_killed(mta_server_factory):
    server = mta_server_factory({"workers": 2})
    children = [_wait_both_started(server)]
    server.kill9()
    assert _wait_gone(children) == [], "a worker outlived its parent"
    server.start()  # the ports are free again
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        assert client.noop()[0] == 250


def test_long_lived_connections_are_spread_evenly(mta_server_factory):
    """20 persistent connections end up 10/10 (within one) whatever SO_REUSEPORT's
    hash did, and every one of them still works, TLS included."""
    import ssl

    from mta.process.balance import LoadTable

    server = mta_server_factory({"workers": 2})
    _wait_both_started(server)
    clients = []
    try:
        for _ in range(20):
            client = smtplib.SMTP(server.host, server.smtp_port, timeout=30)
            client.ehlo("c.test")
            clients.append(client)
        table = LoadTable(str(server.datadir / "run" / "load"), 2, 0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loads = table.loads()
            if sum(loads) == 20 and max(loads) - min(loads) <= 2:
                break
            time.sleep(0.05)
        assert sum(loads) == 20 and max(loads) - min(loads) <= 2, loads
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        for i, client in enumerate(clients):
            if i % 5 == 0:
                client.starttls(context=ctx)
                client.ehlo("c.test")
            client.sendmail(
                "s@remote.test", ["postmaster@localhost"], f"Subject: {i}\r\n\r\nx\r\n".encode()
            )
    finally:
        for client in clients:
            client.close()
    wait_for_files(server.maildir("postmaster@localhost") / "new", 20)
