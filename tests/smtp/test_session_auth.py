"""AUTH, sender ownership, rate limits and submission fix-ups in the session."""

from __future__ import annotations

import base64

from twisted.internet import task

from mta.config import ListenerConfig
from mta.policy.ratelimit import RateLimiter
from mta.testing import FakeAuthenticator, FakeSenderPolicy
from tests.smtp.helpers import make_harness

SUBMISSION = ListenerConfig("submission", "127.0.0.1", 2587, "required", "required")
PLAIN = base64.b64encode(b"\0alice@example.test\0secret").decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tls_harness(listener=SUBMISSION, users=None, hold=False, **kw):
    auth = FakeAuthenticator(
        users if users is not None else {"alice@example.test": b"secret"}, hold=hold
    )
    h = make_harness(listener=listener, tls=object(), authenticator=auth, **kw)
    h.send("EHLO c\r\nSTARTTLS\r\n")
    h.replies()
    return h, auth


def test_auth_advertised_only_after_tls():
    h, _ = tls_harness()
    h.send("EHLO c\r\n")
    assert "250 AUTH PLAIN LOGIN" in h.replies()
    plain = make_harness(listener=SUBMISSION, tls=object(), authenticator=FakeAuthenticator({}))
    plain.send("EHLO c\r\n")
    assert not any("AUTH" in line for line in plain.replies())


def test_auth_plain_then_mail():
    h, auth = tls_harness()
    h.send(
        f"EHLO c\r\nMAIL FROM:<alice@example.test>\r\nAUTH PLAIN {PLAIN}\r\nMAIL FROM:<alice@example.test>\r\n"
    )
    lines = h.replies()
    assert lines[-3:] == [
        "530 5.7.0 Authentication required",
        "235 2.7.0 Authentication successful",
        "250 2.1.0 Ok",
    ]
    assert h.session.authenticated_as == "alice@example.test"
    assert auth.attempts == [("alice@example.test", "PLAIN")]


def test_auth_login_exchange():
    h, _ = tls_harness()
    h.send("EHLO c\r\nAUTH LOGIN\r\n")
    assert h.replies()[-1] == "334 VXNlcm5hbWU6"
    h.send(b64("alice@example.test") + "\r\n")
    assert h.replies() == ["334 UGFzc3dvcmQ6"]
    h.send(b64("secret") + "\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]


def test_auth_error_codes():
    h, _ = tls_harness()
    h.send("EHLO c\r\n")
    h.replies()
    h.send("AUTH PLAIN !!!notbase64\r\n")
    assert h.codes() == ["501"]
    h.send("AUTH LOGIN\r\n*\r\n")
    assert h.codes() == ["334", "501"]
    h.send("AUTH PLAIN " + b64("\0alice@example.test\0wrong") + "\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    h.send("AUTH FOO\r\nNOOP\r\n")
    assert h.codes() == ["504", "250"]
    assert h.session.authenticated_as is None


def test_auth_twice_and_inside_a_transaction():
    h, _ = tls_harness(listener=ListenerConfig("smtp", "127.0.0.1", 2525, "starttls", "optional"))
    h.send(
        f"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nAUTH PLAIN {PLAIN}\r\nRSET\r\nAUTH PLAIN {PLAIN}\r\nAUTH PLAIN {PLAIN}\r\n"
    )
    assert h.codes()[-5:] == ["250", "503", "250", "235", "503"]


def test_pipelined_mail_waits_for_a_slow_authentication():
    h, auth = tls_harness(hold=True)
    h.send(
        f"EHLO c\r\nAUTH PLAIN {PLAIN}\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@remote.test>\r\n"
    )
    assert h.replies()[-1].startswith("250 ")  # only the EHLO reply
    auth.release()
    assert h.replies() == ["235 2.7.0 Authentication successful", "250 2.1.0 Ok", "250 2.1.5 Ok"]


def test_authenticated_user_may_relay_but_not_forge_the_sender():
    policy = FakeSenderPolicy({"alice@example.test": {"alice@example.test", "sales@example.test"}})
    h, _ = tls_harness(sender_policy=policy)
    h.send(f"EHLO c\r\nAUTH PLAIN {PLAIN}\r\n")
    h.replies()
    h.send(
        "MAIL FROM:<ceo@example.test>\r\nMAIL FROM:<sales@example.test>\r\nRCPT TO:<someone@remote.test>\r\n"
    )
    assert h.replies() == [
        "553 5.7.1 Sender address not owned by user",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
    ]


def test_rate_limit_per_ip_and_per_user():
    clock = task.Clock()
    h, _ = tls_harness(
        clock=clock, ip_limiter=RateLimiter(clock, 100), user_limiter=RateLimiter(clock, 2)
    )
    h.send(f"EHLO c\r\nAUTH PLAIN {PLAIN}\r\n")
    h.replies()
    h.send("MAIL FROM:<alice@example.test>\r\nRSET\r\n" * 3)
    assert h.codes() == ["250", "250", "250", "250", "451", "250"]
    clock.advance(60)
    h.send("MAIL FROM:<alice@example.test>\r\n")
    assert h.codes() == ["250"]


def test_submission_fixups_add_message_id_and_date_only_when_missing():
    h, _ = tls_harness()
    h.send(f"EHLO c\r\nAUTH PLAIN {PLAIN}\r\n")
    h.send(
        "MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@remote.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    h.send(
        "MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@remote.test>\r\nDATA\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a@b>\r\n\r\nbody\r\n.\r\n"
    )
    first, second = h.spool.committed
    assert b"\r\nMessage-ID: <Q000001@mx.example.test>\r\nDate: " in first.trace_headers
    assert b"Message-ID" not in second.trace_headers and b"Date:" not in second.trace_headers
    assert b"with ESMTPSA" in first.trace_headers


def test_unauthenticated_relay_mail_is_not_modified():
    h = make_harness()
    h.ehlo()
    h.send(
        "MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n"
    )
    assert b"Message-ID" not in h.spool.committed[0].trace_headers


def test_auth_line_may_be_longer_than_a_command():
    long_password = "p" * 3000
    h, _ = tls_harness(users={"alice@example.test": long_password.encode()})
    h.send("EHLO c\r\nAUTH PLAIN " + b64("\0alice@example.test\0" + long_password) + "\r\n")
    assert h.replies()[-1] == "235 2.7.0 Authentication successful"
