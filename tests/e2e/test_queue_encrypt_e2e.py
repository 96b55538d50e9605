"""`[queue] encrypt = true` through `twistd mta`: what waits in the queue, small or
spilled, is sealed on the disk; the operator still lists and shows it; local
delivery and a restart (recovery reads the sealed files back) work; retiring the
key it is sealed under is refused while it is queued."""

from __future__ import annotations

import os
import smtplib
import time

from tests.conftest import free_port

TIMEOUT = 30.0
MARK = b"SEALED-IN-QUEUE-4b1d"


def message(size: int) -> bytes:
    head = b"Subject: " + MARK + b"\r\n\r\n"
    line = MARK + b" " + b"y" * 70 + b"\r\n"
    return head + line * (size // len(line) + 1)


def disk_has(root, needle: bytes) -> list[str]:
    found = []
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
            except OSError:
                continue
    return found


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def deferred_ids(server) -> list[str]:
    out = server.admin("queue", "list", check=True).stdout
    return [p[0] for p in (line.split() for line in out.splitlines()) if p[1:2] == ["deferred"]]


def test_queued_mail_is_sealed_on_disk(mta_server_factory):
    closed = free_port()  # the smarthost refuses connections: remote mail stays queued
    server = mta_server_factory(
        {
            "relay_networks": ["127.0.0.0/8"],
            "relay": {"smarthost": f"127.0.0.1:{closed}"},
            "queue": {"encrypt": True, "retry_schedule": [3600.0]},
            "storage": {"master_key_file": "keys/master.key"},
        },
        start=False,
    )
    server.admin("key", "init", check=True)
    server.start()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("alice@example.test", ["bob@remote.test"], message(2_000))
        smtp.sendmail("alice@example.test", ["bob@remote.test"], message(900_000))  # spills
        smtp.sendmail("alice@example.test", ["postmaster@localhost"], message(3_000))
    ids = wait_for(lambda: (lambda i: i if len(i) == 2 else None)(deferred_ids(server)), "queue")
    new = server.maildir("postmaster@localhost") / "new"
    (local,) = wait_for(lambda: sorted(new.iterdir()) if new.is_dir() else [], "local mail")
    assert MARK in local.read_bytes()  # delivered in clear into the (clear) mailbox

    queue = server.datadir / "queue"
    assert disk_has(queue, MARK) == []
    assert disk_has(queue, b"Received: from") == []  # trace headers sealed too
    shown = server.admin("queue", "show", ids[0], check=True).stdout
    assert "Subject: " + MARK.decode() in shown and "Received: from" in shown

    key_id = server.admin("key", "list", check=True).stdout.split()[0]
    server.admin("key", "rotate", check=True)
    refused = server.admin("key", "retire", key_id)
    assert refused.returncode != 0
    assert "2 queued message(s)" in refused.stderr and "key kept" in refused.stderr

    # A restart reads the sealed entries back (recovery) and still holds them.
    server.stop()
    server.start()
    assert sorted(wait_for(lambda: deferred_ids(server), "recovered queue")) == sorted(ids)
    shown = server.admin("queue", "show", ids[1], check=True).stdout
    assert "Subject: " + MARK.decode() in shown
    assert disk_has(queue, MARK) == []


def test_queue_encrypt_without_a_key_is_refused_at_start(mta_server_factory):
    server = mta_server_factory(
        {"queue": {"encrypt": True}, "storage": {"master_key_file": "keys/absent.key"}},
        start=False,
    )
    result = server.admin("check-config")
    assert result.returncode == 0, result.stderr  # the config itself is fine
    checked = mta_server_factory({"queue": {"encrypt": True}}, start=False, name="nokey")
    bad = checked.admin("check-config")
    assert bad.returncode != 0 and "queue.encrypt" in (bad.stdout + bad.stderr)
