"""`mta-admin queue ...` against a running `twistd mta`: hold, release, show, delete,
and the same commands on the files when the server is stopped."""

from __future__ import annotations

import smtplib
import time

from tests.conftest import free_port

TIMEOUT = 30.0


def send(server, rcpt="bob@remote.test"):
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("alice@example.test", [rcpt], b"Subject: queued\r\n\r\nhello\r\n")


def queued_ids(server, state):
    out = server.admin("queue", "list", check=True).stdout
    ids = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == state and len(parts[0]) >= 16:
            ids.append(parts[0])
    return ids


def wait_for(server, state, count=1):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ids = queued_ids(server, state)
        if len(ids) >= count:
            return ids
        time.sleep(0.1)
    raise AssertionError(
        f"no {state} entry after {TIMEOUT}s:\n{server.admin('queue', 'list').stdout}"
    )


def test_hold_release_show_delete_on_a_running_server(mta_server_factory):
    closed = free_port()  # the smarthost refuses connections: mail stays deferred
    server = mta_server_factory(
        {
            "relay_networks": ["127.0.0.0/8"],
            "relay": {"smarthost": f"127.0.0.1:{closed}"},
            "queue": {"retry_schedule": [3600.0]},
        }
    )
    send(server)
    (qid,) = wait_for(server, "deferred")
    held = server.admin("queue", "hold", qid)
    assert held.returncode == 0, held.stderr
    assert held.stdout.strip() == f"{qid} held"
    assert (server.datadir / "queue" / "hold" / qid).exists()
    assert queued_ids(server, "hold") == [qid]
    show = server.admin("queue", "show", qid, check=True).stdout
    assert "Place:      hold" in show and "<bob@remote.test> [deferred]" in show
    assert "Subject: queued" in show
    again = server.admin("queue", "hold", qid)
    assert again.returncode == 1 and "not in the active queue" in again.stderr

    released = server.admin("queue", "release", qid)
    assert released.stdout.strip() == f"{qid} released", released.stderr
    assert wait_for(server, "deferred") == [qid]
    assert server.admin("queue", "retry", qid, check=True).stdout.strip() in (
        f"{qid} scheduled now",
        f"{qid} is already being tried",
    )
    flushed = server.admin("queue", "flush", check=True).stdout
    assert "scheduled now" in flushed

    deleted = server.admin("queue", "delete", qid)
    assert deleted.stdout.strip() == f"{qid} deleted", deleted.stderr
    assert "Mail queue is empty" in server.admin("queue", "list", check=True).stdout
    assert server.admin("queue", "dead", check=True).stdout.startswith("No dead letters")

    # Stopped: the same commands work on the files; a held entry survives a restart.
    send(server)
    (qid2,) = wait_for(server, "deferred")
    server.stop()
    assert server.admin("queue", "hold", qid2, check=True).stdout.strip() == f"{qid2} held"
    server.start()
    assert queued_ids(server, "hold") == [qid2]
    assert server.admin("queue", "release", qid2, check=True).stdout.strip() == f"{qid2} released"
    assert wait_for(server, "deferred") == [qid2]
    log = server.log()
    assert '"event": "queue_control"' in log or "queue command" in log
