"""Quotas end to end: a real `twistd mta`, smtplib over loopback, `mta-admin` as a
subprocess, the usage read from the real database."""

from __future__ import annotations

import smtplib
import time

import pytest

from mta.db import MIB, Database

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0  # a bound on each wait, not a timing assertion
KB = 1024
SENDER = "sender@example.test"


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def message(size: int, subject: str = "quota") -> bytes:
    head = f"From: {SENDER}\r\nTo: someone\r\nSubject: {subject}\r\n\r\n".encode()
    line = b"0123456789" * 7 + b"\r\n"
    return head + line * (size // len(line))


def admin(server, *args: str) -> str:
    done = server.admin(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def user(server, email: str):
    with Database(str(server.datadir / "mta.db")) as db:
        return db.require_user(email)


def set_usage(server, email: str, used: int) -> None:
    with Database(str(server.datadir / "mta.db")) as db:
        db.set_usage(email, used)


def maildir_files(server, email: str) -> list:
    new = server.maildir(email) / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def rcpt_reply(server, rcpt: str, size: int | None) -> tuple[int, str]:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        client.ehlo("client.remote.test")
        options = [f"SIZE={size}"] if size is not None else []
        code, _ = client.mail(SENDER, options)
        assert code == 250
        code, text = client.rcpt(rcpt)
        return code, text.decode()


@pytest.fixture
def server(mta_server_factory):
    server = mta_server_factory()
    for email in ("bob@example.test", "carol@example.test", SENDER):
        admin(server, "user", "add", email, "--no-password")
    admin(server, "user", "quota", "bob@example.test", "1")
    set_usage(server, "bob@example.test", 900 * KB)
    # The server reads usage through its directory, refreshed once a second.
    wait_for(lambda: rcpt_reply(server, "bob@example.test", 200 * KB)[0] == 452, "the quota")
    return server


def test_rcpt_452_when_size_would_overfill_552_when_message_alone_is_too_big(server):
    code, text = rcpt_reply(server, "bob@example.test", 200 * KB)
    assert code == 452 and text.startswith("4.2.2 Mailbox full")
    code, text = rcpt_reply(server, "bob@example.test", 2 * MIB)
    assert code == 552 and text.startswith("5.2.2 ")
    assert rcpt_reply(server, "bob@example.test", 50 * KB)[0] == 250  # still fits
    assert rcpt_reply(server, "carol@example.test", 2 * MIB)[0] == 250  # no quota


def test_end_of_data_552_when_every_recipient_is_over(server):
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        client.ehlo("client.remote.test")
        client.mail(SENDER)  # no SIZE=: only the end of data shows it
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(message(200 * KB))
    assert code == 552 and text.startswith(b"5.2.2 ")
    assert maildir_files(server, "bob@example.test") == []
    assert user(server, "bob@example.test").used_bytes == 900 * KB


def test_one_recipient_over_at_end_of_data_is_bounced_the_others_get_it(server):
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        client.ehlo("client.remote.test")
        client.mail(SENDER)
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.rcpt("carol@example.test")[0] == 250
        code, _ = client.data(message(200 * KB, "for two"))
    assert code == 250
    [copy] = wait_for(lambda: maildir_files(server, "carol@example.test"), "carol's copy")
    assert b"Subject: for two" in copy.read_bytes()
    [dsn] = wait_for(lambda: maildir_files(server, SENDER), "the bounce")
    report = dsn.read_bytes()
    assert b"Final-Recipient: rfc822; bob@example.test" in report
    assert b"Status: 5.2.2" in report
    assert b"carol@example.test" not in report.split(b"\r\n\r\n", 1)[1].split(b"Subject:")[0]
    assert maildir_files(server, "bob@example.test") == []
    assert user(server, "bob@example.test").used_bytes == 900 * KB


@pytest.mark.parametrize("backend", ["maildir", "sql"])
def test_usage_grows_with_delivery_and_shrinks_with_mail_delete(mta_server_factory, backend):
    server = mta_server_factory({"storage": {"backend": backend}})
    admin(server, "user", "add", "dave@example.test", "--no-password")
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        for n in range(2):
            client.sendmail("x@remote.test", ["dave@example.test"], message(100 * KB, f"n{n}"))
    listing = wait_for(
        lambda: admin(server, "mail", "list", "dave@example.test").splitlines()[1:3], "delivery"
    )
    ids = [line.split()[0] for line in listing]
    sizes = [int(line.split()[3]) for line in listing]  # ID, DATE (2 words), SIZE, ...
    assert all(size > 100 * KB for size in sizes)
    dave = wait_for(
        lambda: (u := user(server, "dave@example.test")).used_bytes == sum(sizes) and u,
        "the usage to reach what was stored",
    )
    assert dave.used_mb == 1  # 200 KB, rounded up to whole MB
    assert "0.2 MB used, no quota" in admin(server, "user", "quota", "dave@example.test")
    admin(server, "mail", "delete", "dave@example.test", ids[0])
    assert user(server, "dave@example.test").used_bytes == sizes[1]
    admin(server, "mail", "delete", "dave@example.test", ids[1])
    dave = user(server, "dave@example.test")
    assert (dave.used_bytes, dave.used_mb) == (0, 0)
