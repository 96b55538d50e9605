"""The PostgreSQL engine (mta.db.postgres): the dialect seam, a connection per
thread, writers queued as on SQLite, and outages: an operation while the database is
gone fails with `DatabaseUnavailable` (451 in an SMTP session), the next one after
it is back works, with no restart of mta.

The outage here is the database disappearing under live connections (DROP DATABASE
WITH (FORCE) terminates them, as a server restart does) and coming back; a real
server stop and start is in test_postgres_restart.py (a private server: the shared
one is never stopped).
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request

import psycopg
import pytest

from mta.db import AuthFailure, Database, DatabaseUnavailable
from mta.db.postgres import pg_sql
from tests.conftest import free_port
from tests.pg import admin_connection


def test_placeholders_become_psycopg_ones_outside_quotes():
    assert pg_sql("SELECT a FROM t WHERE b = ? AND c = '?' AND \"d?\" = ?") == (
        "SELECT a FROM t WHERE b = %s AND c = '?' AND \"d?\" = %s"
    )
    assert pg_sql("SELECT 'x%' || ?") == "SELECT 'x%%' || %s"
    assert pg_sql("SELECT 'x%'", False) == "SELECT 'x%'"  # no parameters: sent as is


def test_each_thread_gets_its_own_connection_and_close_ends_them_all(postgres_dsn):
    db = Database(postgres_dsn)
    pids = []

    def work():
        with db._read() as conn:
            pids.append(conn.execute("SELECT pg_backend_pid()").fetchone()[0])

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(pids)) == 3
    db.close()
    # A backend leaves pg_stat_activity a moment after its client hung up: wait for it.
    deadline = time.monotonic() + 10
    with admin_connection() as admin:
        while True:
            alive = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
            ).fetchone()[0]
            if alive == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert alive == 0


def test_concurrent_read_modify_write_loses_nothing(postgres_dsn):
    """Two nodes counting AUTH failures of one key at once (what mta.policy.lockout
    does in `db.transaction()`): the write lock queues them as SQLite's does."""
    nodes = [Database(postgres_dsn), Database(postgres_dsn)]

    def count(db):
        for _ in range(25):
            with db.transaction():
                current = db.auth_failures(["ip:192.0.2.1"]).get("ip:192.0.2.1")
                n = current.failures if current else 0
                db.put_auth_failure(AuthFailure("ip:192.0.2.1", n + 1, 1.0, None))

    threads = [threading.Thread(target=count, args=(db,)) for db in nodes for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert nodes[0].auth_failures(["ip:192.0.2.1"])["ip:192.0.2.1"].failures == 100
    for db in nodes:
        db.close()


def test_unreachable_server_is_a_clear_temporary_error():
    port = free_port()
    with pytest.raises(DatabaseUnavailable) as raised:
        Database(f"postgresql://mta:secret@127.0.0.1:{port}/mta")
    message = str(raised.value)
    assert f"PostgreSQL at postgresql://mta@127.0.0.1:{port}/mta is unavailable" in message
    assert "secret" not in message


def terminate_connections(dsn_database: str) -> int:
    with admin_connection() as admin:
        return len(
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dsn_database,),
            ).fetchall()
        )


def test_connections_cut_under_an_idle_database_reconnect_by_themselves(postgres_dsn):
    db = Database(postgres_dsn)
    db.add_user("alice@example.test")
    assert terminate_connections(postgres_dsn.rsplit("/", 1)[1]) >= 1
    # A read and a write transaction each find the stale connection and retry on a
    # new one: no error reaches the caller.
    assert db.get_user("alice@example.test") is not None
    assert terminate_connections(postgres_dsn.rsplit("/", 1)[1]) >= 1
    db.add_user("bob@example.test")
    assert [u.email for u in db.list_users()] == ["alice@example.test", "bob@example.test"]
    db.close()


def test_a_connection_cut_inside_a_transaction_fails_it_and_the_next_works(postgres_dsn):
    db = Database(postgres_dsn)
    with pytest.raises(DatabaseUnavailable, match="unavailable"):
        with db.transaction():
            db.add_user("alice@example.test")
            terminate_connections(postgres_dsn.rsplit("/", 1)[1])
            db.record_audit("user.add", "alice@example.test")
    assert db.get_user("alice@example.test") is None  # rolled back by the server
    db.add_user("alice@example.test")
    assert db.get_user("alice@example.test") is not None
    db.close()


# -- the daemon through an outage ---------------------------------------------------


def rcpt(server, address: str) -> int:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as smtp:
        smtp.ehlo("client.example.test")
        smtp.mail("sender@remote.test")
        code, _ = smtp.rcpt(address)
        return code


def auth(server, user: str, password: str) -> int:
    """One AUTH PLAIN on submission, after STARTTLS."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(server.host, server.submission_port, timeout=30) as smtp:
        smtp.ehlo("mua.example.test")
        smtp.starttls(context=context)
        smtp.ehlo("mua.example.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return smtp.docmd("AUTH", "PLAIN " + token)[0]


def readyz(server) -> dict:
    url = f"http://{server.host}:{server.http_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        return json.load(e)


def test_the_daemon_answers_451_while_the_database_is_gone_and_recovers(
    mta_server_factory, postgres_dsn
):
    name = postgres_dsn.rsplit("/", 1)[1]
    cheap = {"time_cost": 1, "memory_cost": 8192, "parallelism": 1}
    server = mta_server_factory({"database": {"dsn": postgres_dsn}, "auth": cheap}, start=False)
    # bob exists before the start, so he is in the directory's snapshot.
    add = server.admin("user", "add", "--password-stdin", "bob@example.test", input="pw1\n")
    assert add.returncode == 0, add.stderr
    server.start()
    assert auth(server, "bob@example.test", "pw1") == 235
    assert rcpt(server, "bob@example.test") == 250
    assert rcpt(server, "nobody@example.test") == 550
    assert readyz(server)["checks"]["database"]["status"] == "ok"

    with admin_connection() as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    # An unknown name must be asked of the database: a temporary failure, not 550.
    assert rcpt(server, "carol@example.test") == 451
    assert readyz(server)["checks"]["database"]["status"] == "fail"
    assert rcpt(server, "bob@example.test") == 250  # the snapshot still answers
    assert auth(server, "bob@example.test", "pw1") == 454  # not 535: try again later

    with admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    assert server.admin("db", "migrate").returncode == 0
    assert server.admin("user", "add", "--no-password", "carol@example.test").returncode == 0
    assert rcpt(server, "carol@example.test") == 250  # reconnected by itself
    assert auth(server, "carol@example.test", "x") == 535  # no password: refused
    assert readyz(server)["checks"]["database"]["status"] == "ok"
    assert server.running


def test_psycopg_is_what_tests_and_mta_share():
    assert psycopg.__version__ >= "3.1"


def test_mail_through_the_daemon_into_the_sql_store_on_postgresql(mta_server_factory, postgres_dsn):
    """The whole path on PostgreSQL: RCPT resolved from it, the message stored in
    its `messages` table (quota usage charged), found by `mta-admin search`."""
    server = mta_server_factory(
        {"database": {"dsn": postgres_dsn}, "storage": {"backend": "sql"}}, start=False
    )
    assert server.admin("user", "add", "--no-password", "bob@example.test").returncode == 0
    assert server.admin("user", "quota", "bob@example.test", "10").returncode == 0
    server.start()
    body = "From: Alice <alice@remote.test>\r\nSubject: Quarterly numbers\r\n\r\nsee attached\r\n"
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as smtp:
        smtp.sendmail("alice@remote.test", ["bob@example.test"], body)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = server.admin("search", "quarterly", "--user", "bob@example.test")
        if "Quarterly numbers" in found.stdout:
            break
        time.sleep(0.2)
    assert "Quarterly numbers" in found.stdout, (found.stdout, found.stderr, server.log())
    listed = server.admin("mail", "list", "bob@example.test")
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 2
    with psycopg.connect(postgres_dsn) as conn:
        (used,) = conn.execute(
            "SELECT used_bytes FROM users WHERE username = 'bob@example.test'"
        ).fetchone()
        (size,) = conn.execute(
            'SELECT size FROM messages WHERE "user" = %s', ("bob@example.test",)
        ).fetchone()
    assert used == size > len(body)
