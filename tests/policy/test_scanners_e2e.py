"""End to end: `twistd mta` with a real clamd and spamd behind its `[checks]`, fed by
smtplib over loopback."""

from __future__ import annotations

import json
import smtplib
import socket

import pytest

from tests.e2e.test_receive import wait_for_files
from tests.policy.conftest import GTUBE
from tests.policy.test_clamd import ATTACHED

HEAD = (
    b"From: sender@remote.test\r\nTo: postmaster@localhost\r\nSubject: %s\r\n"
    b"Message-ID: <%s@remote.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
)


def message(name: bytes, text: bytes) -> bytes:
    return HEAD % (name, name) + text + b"\r\n"


def test_virus_rejected_spam_tagged_clean_delivered(mta_server_factory, spamd_server, clamd_server):
    server = mta_server_factory(
        {"checks": {"spamd": spamd_server.address, "clamd": clamd_server.address, "timeout": 60}}
    )
    with smtplib.SMTP(server.host, server.smtp_port, timeout=90) as client:
        client.ehlo("client.remote.test")
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("sender@remote.test", ["postmaster@localhost"], ATTACHED)
        assert e.value.smtp_code == 554
        assert b"5.7.0" in e.value.smtp_error and b"MTA.Test.EICAR" in e.value.smtp_error
        client.rset()
        spam = message(b"spam", b"This is the GTUBE\r\n" + GTUBE)
        assert client.sendmail("sender@remote.test", ["postmaster@localhost"], spam) == {}
        clean = message(b"clean", b"Hello, the meeting is at ten.")
        assert client.sendmail("sender@remote.test", ["postmaster@localhost"], clean) == {}
    paths = wait_for_files(server.maildir("postmaster@localhost") / "new", 2)
    stored = {p.read_bytes().split(b"Subject: ")[1][:5]: p.read_bytes() for p in paths}
    assert b"X-Spam-Flag: YES\r\n" in stored[b"spam\r"]
    assert b"X-Spam-Status: Yes, score=100" in stored[b"spam\r"]
    assert b"X-Spam-Status: No, score=" in stored[b"clean"]
    assert b"X-Spam-Flag" not in stored[b"clean"]
    events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    checks = [e for e in events if e.get("event") == "check"]
    assert all(e.get("qid") and e["duration"] >= 0 for e in checks)
    assert {e["result"] for e in checks if e["check"] == "clamd"} == {"infected", "clean"}
    assert {e["result"] for e in checks if e["check"] == "spamd"} == {"spam", "ham"}


def test_clamd_down_defers_even_with_fail_open(mta_server_factory):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    server = mta_server_factory({"checks": {"clamd": address, "fail": "open"}})
    with smtplib.SMTP(server.host, server.smtp_port, timeout=90) as client:
        client.ehlo("client.remote.test")
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("sender@remote.test", ["postmaster@localhost"], message(b"x", b"hi"))
    assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.3.0")
    assert not (server.maildir("postmaster@localhost") / "new").exists() or not list(
        (server.maildir("postmaster@localhost") / "new").iterdir()
    )
