"""Submission end to end: real TLS (smtplib, swaks, openssl s_client), Argon2id AUTH,
lockouts, sender ownership, and the metrics/audit trail it leaves."""

from __future__ import annotations

import base64
import smtplib
import sqlite3
import ssl
import subprocess
import time

import pytest

from tests.conftest import require_tool
from tests.e2e.test_receive import wait_for_files

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
# Cheap Argon2id parameters keep the suite fast; the code path is the production one.
FAST_AUTH = {
    "auth": {
        "time_cost": 1,
        "memory_cost": 8192,
        "parallelism": 1,
        "max_failures": 3,
        "lockout_seconds": 600,
    }
}


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def server(mta_server_factory):
    server = mta_server_factory(FAST_AUTH)
    out = server.admin(
        "user", "add", "alice@example.test", "--password-stdin", input=PASSWORD + "\n"
    )
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout + out.stderr
    return server


def submission(server) -> smtplib.SMTP:
    client = smtplib.SMTP(server.host, server.submission_port, timeout=30)
    client.ehlo("mua.example.test")
    client.starttls(context=tls_context())
    client.ehlo("mua.example.test")
    return client


def test_login_and_send_through_submission(server):
    with submission(server) as client:
        assert "PLAIN" in client.esmtp_features["auth"] and "LOGIN" in client.esmtp_features["auth"]
        client.login("alice@example.test", PASSWORD)
        refused = client.sendmail(
            "alice@example.test",
            ["postmaster@localhost", "someone@elsewhere.test"],
            b"Subject: sub\r\n\r\nhi\r\n",
        )
        assert refused == {}
    [path] = wait_for_files(server.maildir("postmaster@localhost") / "new", 1)
    data = path.read_bytes()
    assert b"with ESMTPSA" in data
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data  # RFC 6409 fix-ups
    rows = (
        sqlite3.connect(server.datadir / "mta.db")
        .execute(
            "SELECT action, success FROM audit_log WHERE username = 'alice@example.test' AND action LIKE 'auth.%'"
        )
        .fetchall()
    )
    assert ("auth.success", 1) in rows


def test_smtps_implicit_tls_login(server):
    with smtplib.SMTP_SSL(
        server.host, server.smtps_port, timeout=30, context=tls_context()
    ) as client:
        client.ehlo("mua.example.test")
        client.login("alice@example.test", PASSWORD)
        assert (
            client.sendmail(
                "alice@example.test", ["postmaster@localhost"], b"Subject: smtps\r\n\r\nx\r\n"
            )
            == {}
        )


def test_auth_is_refused_before_tls_on_every_listener(server):
    for port in (server.smtp_port, server.submission_port):
        with smtplib.SMTP(server.host, port, timeout=30) as client:
            client.ehlo("mua.example.test")
            assert not client.has_extn("auth")
            code, text = client.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABjb3JyZWN0")
            assert (code, text[:6]) == (538, b"5.7.11")


def test_cannot_send_as_someone_else(server):
    with submission(server) as client:
        client.login("alice@example.test", PASSWORD)
        code, text = client.mail("ceo@example.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        code, _ = client.mail("alice@example.test")
        assert code == 250


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> int:
    """One AUTH PLAIN attempt (smtplib.login would try every mechanism in turn)."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + token)[0]


def test_wrong_passwords_lock_the_account_even_for_the_right_one(server):
    with submission(server) as client:
        assert [auth_plain(client, "alice@example.test", "wrong") for _ in range(3)] == [
            535,
            535,
            535,
        ]
    # Reconnecting does not reset the count: now even the right password is refused.
    with submission(server) as client:
        assert auth_plain(client, "alice@example.test", PASSWORD) == 454
    out = server.admin("user", "unlock", "alice@example.test", "--ip", "127.0.0.1")
    assert out.returncode == 0, out.stderr
    # The server re-reads a cached lockout every few seconds: poll, bounded.
    deadline = time.monotonic() + 30
    with submission(server) as client:
        while (
            code := auth_plain(client, "alice@example.test", PASSWORD)
        ) == 454 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert code == 235


def test_swaks_tls_auth(server):
    swaks = require_tool("swaks")
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.submission_port}", "--tls", "--auth", "LOGIN",
         "--auth-user", "alice@example.test", "--auth-password", PASSWORD,
         "--from", "alice@example.test", "--to", "postmaster@localhost"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0 Authentication successful" in out.stdout


def test_openssl_s_client_sees_tls12_or_better_on_both_tls_listeners(server):
    openssl = require_tool("openssl")
    for args in (["-starttls", "smtp", "-connect", f"127.0.0.1:{server.submission_port}"],
                 ["-connect", f"127.0.0.1:{server.smtps_port}"]):  # fmt: skip
        out = subprocess.run(
            [openssl, "s_client", *args, "-brief", "-ign_eof", "-crlf"], input="EHLO o.test\nQUIT\n",
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        text = out.stdout + out.stderr
        assert "Protocol version: TLSv1.3" in text or "Protocol version: TLSv1.2" in text, text
        assert "AUTH PLAIN LOGIN" in text, text
        refused = subprocess.run(
            [openssl, "s_client", *args, "-tls1_1"],
            input="QUIT\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "Protocol version: TLSv1.1" not in refused.stdout + refused.stderr


def test_reactor_keeps_answering_while_ten_argon2id_verifies_run(mta_server_factory):
    """Ten logins at a real Argon2id cost run on the bounded auth pool; meanwhile
    another session's NOOPs keep being answered. Counted, not timed: the NOOP loop
    runs until every login has its answer, and must have been answered many times."""
    import threading

    server = mta_server_factory(
        {
            "auth": {
                "time_cost": 2,
                "memory_cost": 65536,
                "parallelism": 1,
                "threads": 2,
                "max_failures": 100,
            }
        }
    )
    out = server.admin(
        "user", "add", "alice@example.test", "--password-stdin", input=PASSWORD + "\n"
    )
    assert out.returncode == 0, out.stderr
    clients = [submission(server) for _ in range(10)]
    watcher = smtplib.SMTP(server.host, server.smtp_port, timeout=30)
    watcher.ehlo("w.test")
    answers: list[int] = []

    def login(client):
        answers.append(auth_plain(client, "alice@example.test", PASSWORD))

    threads = [threading.Thread(target=login, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    noops = 0
    deadline = time.monotonic() + 120  # a bound on the loop, not a timing assertion
    while len(answers) < 10 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        assert watcher.noop()[0] == 250
        noops += 1
    for t in threads:
        t.join(60)
    assert answers == [235] * 10
    assert noops >= 20, f"only {noops} NOOPs answered while ten verifies ran"
    for c in [*clients, watcher]:
        c.close()
