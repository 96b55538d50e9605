"""End to end: the JSON log of a whole run follows each message by its queue id, and
never contains a password, an AUTH string, a hash or a body."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import time

import pytest

pytestmark = pytest.mark.e2e

PASSWORD = "Tr0ub4dor-and-3-horses"
BODY_MARKER = "secret-body-line-7f3a"


def log_records(server) -> list[dict]:
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def wait_for_event(server, event: str, qid: str, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [r for r in log_records(server) if r.get("qid") == qid]
        if any(r["event"] == event for r in records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"no {event} event for {qid}:\n{server.log()}")


def test_a_message_is_followed_by_its_qid_and_no_secret_is_logged(mta_server):
    added = mta_server.admin(
        "user", "add", "--password-stdin", "alice@example.test", input=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    plain = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode()).decode()
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.starttls(context=ctx)
        client.ehlo()
        # Raw AUTH lines whether or not this listener offers AUTH: whatever the reply,
        # the string must not reach the log.
        client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice@example.test\0wrong").decode())
        client.docmd("AUTH", "PLAIN " + plain)
        client.rset()
        client.mail("alice@example.test")
        client.rcpt("postmaster@localhost")
        code, reply = client.data(
            f"From: alice@example.test\r\nSubject: log test\r\n\r\n{BODY_MARKER}\r\n".encode()
        )
    assert code == 250, reply
    qid = reply.decode().rsplit(" ", 1)[-1]

    records = wait_for_event(mta_server, "done", qid)
    events = [r["event"] for r in records]
    for state in ("queued", "accepted", "delivered", "done"):
        assert events.count(state) == 1, events
    for r in records:
        assert {"timestamp", "level", "component", "event", "qid"} <= set(r)
    accepted = next(r for r in records if r["event"] == "accepted")
    assert accepted["sender"] == "alice@example.test"
    assert accepted["recipients"] == ["postmaster@localhost"]
    assert accepted["size"] > 0 and accepted["duration"] >= 0
    # `grep QID` finds exactly these lines, every one of them JSON.
    grepped = [line for line in mta_server.log().splitlines() if qid in line]
    assert len(grepped) == len(records)

    text = mta_server.log()
    for secret in (PASSWORD, plain, base64.b64encode(PASSWORD.encode()).decode(), BODY_MARKER):
        assert secret not in text
    assert "$argon2" not in text
