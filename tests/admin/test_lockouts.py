"""mta-admin lockout list|clear, and what user unlock says (mta.admin.lockouts, issue #11).

Most tests write `auth_failures` rows directly; the last ones let the daemon's own
`Authenticator` and `LockoutTracker` lock an account and an address, so the keys
the CLI reads are the ones the server writes."""

from __future__ import annotations

import time

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task

from mta.admin.lockouts import stamp
from mta.db import IP_PREFIX, AuthFailure, same_client
from mta.policy import lockout as policy_lockout
from mta.policy.lockout import LockoutRules, LockoutTracker
from mta.smtp.auth import AuditLog, Authenticator

FUTURE = 9_000_000_000.0  # locked for a very long time
PAST = 1_000_000_000.0  # a lockout that ended long ago


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("mta-admin: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


def put(db, key, failures=3, first=None, until=FUTURE):
    first = time.time() - 60 if first is None else first
    db.put_auth_failure(AuthFailure(key, failures, first, until))


def keys(db):
    return sorted(r.key for r in db.list_auth_failures())


# -- lockout list ------------------------------------------------------------------


def test_list_shows_active_account_and_address_lockouts(run, db):
    put(db, "ip:192.0.2.1", failures=7)
    put(db, "bob@example.test", failures=3)
    put(db, "ip:2001:db8::1", failures=4)
    put(db, "carol@example.test", failures=5, until=PAST)  # over
    put(db, "dave@example.test", failures=1, until=None)  # counting, not locked
    status, out, err = run("lockout", "list")
    assert (status, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["KIND", "KEY", "FAILURES", "FIRST", "FAILURE", "LOCKED", "UNTIL"]
    assert [row.split()[:3] for row in rows] == [
        ["account", "bob@example.test", "3"],
        ["ip", "192.0.2.1", "7"],
        ["ip", "2001:db8::1", "4"],
    ]
    assert all(row.endswith(stamp(FUTURE)) for row in rows)


def test_list_all_also_shows_records_that_lock_nothing(run, db):
    put(db, "carol@example.test", failures=5, until=PAST)
    put(db, "dave@example.test", failures=1, until=None)
    _, out, _ = run("lockout", "list", "--all")
    rows = out.splitlines()[1:]
    assert [row.split()[:3] for row in rows] == [
        ["account", "carol@example.test", "5"],
        ["account", "dave@example.test", "1"],
    ]
    assert all(row.endswith(" -") for row in rows)


def test_list_without_lockouts(run, db):
    put(db, "dave@example.test", failures=1, until=None)
    assert run("lockout", "list") == (0, "No active lockouts\n", "")
    db.clear_auth_failures("dave@example.test")
    assert run("lockout", "list", "--all") == (0, "No AUTH failure records\n", "")


# -- lockout clear -----------------------------------------------------------------


def test_clear_an_account_and_its_qualified_keys(run, db):
    put(db, "bob@example.test")
    put(db, "bob@example.test|192.0.2.1")
    put(db, "ip:192.0.2.1")
    status, out, err = run("lockout", "clear", "Bob@Example.test")
    assert (status, out, err) == (0, "cleared bob@example.test (2 lockout records)\n", "")
    assert keys(db) == ["ip:192.0.2.1"]
    entry = db.audit_entries()[-1]
    assert (entry.action, entry.username, entry.details["cleared"]) == (
        "lockout.clear",
        "bob@example.test",
        2,
    )


def test_clear_an_account_that_is_not_a_user(run, db):
    put(db, "guess@example.test")  # attackers guess names that do not exist
    assert run("lockout", "clear", "guess@example.test")[0] == 0
    assert keys(db) == []


@pytest.mark.parametrize(
    "stored, typed",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:DB8:0::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("192.0.2.1", "ip:192.0.2.1"),
    ],
)
def test_clear_a_client_address_however_it_is_spelled(run, db, stored, typed):
    put(db, IP_PREFIX + stored)
    put(db, "ip:192.0.2.10")
    argv = (
        ["lockout", "clear", typed]
        if typed.startswith("ip:")
        else ["lockout", "clear", "--ip", typed]
    )
    status, out, _ = run(*argv)
    assert status == 0 and out.startswith("cleared client ")
    assert keys(db) == ["ip:192.0.2.10"]
    entry = db.audit_entries()[-1]
    assert (entry.action, entry.username, entry.details["cleared"]) == ("lockout.clear", None, 1)


def test_clear_account_and_addresses_at_once(run, db):
    put(db, "bob@example.test")
    put(db, "ip:192.0.2.1")
    status, out, _ = run(
        "lockout", "clear", "bob@example.test", "--ip", "192.0.2.1", "--ip", "198.51.100.7"
    )
    assert status == 0
    assert out.splitlines() == [
        "cleared bob@example.test (1 lockout record)",
        "cleared client 192.0.2.1 (1 lockout record)",
        "no lockout record for client 198.51.100.7",
    ]
    assert keys(db) == []


def test_clear_nothing_is_an_error(run, db):
    status, _, err = run("lockout", "clear", "--ip", "192.0.2.1")
    assert status == 1
    assert_one_line_error(err, "no lockout record for client 192.0.2.1")
    status, _, err = run("lockout", "clear")
    assert status == 2
    assert_one_line_error(err, "--ip")


# -- user unlock names the address lockouts that still hold ------------------------


def failed_login(db, user, ip):
    db.record_audit("auth.failure", user, success=False, ip_address=ip, details={})


def test_user_unlock_says_which_address_lockouts_still_hold(run, db):
    run("user", "add", "bob@example.test")
    put(db, "bob@example.test")
    put(db, "ip:192.0.2.1", failures=5)
    put(db, "ip:198.51.100.7")  # locked, but not by bob's failures
    put(db, "ip:203.0.113.9", until=PAST)  # bob failed from there, but it is over
    for ip in ("192.0.2.1", "192.0.2.1", "203.0.113.9"):
        failed_login(db, "bob@example.test", ip)
    failed_login(db, "carol@example.test", "198.51.100.7")
    status, out, err = run("user", "unlock", "bob@example.test")
    assert status == 0
    assert out == "unlocked bob@example.test (1 lockout record cleared)\n"
    assert err == (
        f"mta-admin: warning: client 192.0.2.1 is still locked out until {stamp(FUTURE)}"
        " (5 failures, some of them for bob@example.test);"
        " clear it with: mta-admin lockout clear --ip 192.0.2.1\n"
    )
    assert db.audit_entries()[-1].details["still_locked"] == ["192.0.2.1"]
    assert "ip:192.0.2.1" in keys(db)


def test_user_unlock_with_ip_clears_it_and_warns_of_nothing(run, db):
    run("user", "add", "bob@example.test")
    put(db, "bob@example.test")
    put(db, "ip:192.0.2.1")
    failed_login(db, "bob@example.test", "192.0.2.1")
    status, out, err = run("user", "unlock", "bob@example.test", "--ip", "192.0.2.1")
    assert (status, err) == (0, "")
    assert out == "unlocked bob@example.test (2 lockout records cleared)\n"
    assert keys(db) == []


# -- against the daemon's own lockout code -----------------------------------------


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class WrongPassword:
    def requestAvatarId(self, credentials):
        return defer.fail(UnauthorizedLogin("wrong password"))


@pytest.fixture
def server(db):
    """The daemon's Authenticator over the CLI's database, at the current time."""
    clock = task.Clock()
    clock.advance(time.time())
    rules = LockoutRules(max_failures=3, failure_window=600.0, lockout_seconds=900.0)
    tracker = LockoutTracker(lambda: db, inline, clock, rules, recheck_interval=0)
    auth = Authenticator(WrongPassword(), tracker, AuditLog(lambda: db, inline), clock)

    def fail(user, ip):
        out = []
        auth.authenticate(user, "guess", ip, "submission").addCallback(out.append)
        assert out and not out[0].ok

    def locked(user, ip):
        out = []
        tracker.check(user, ip).addCallback(out.append)
        return out[0]

    return fail, locked


def test_locks_made_by_the_server_are_listed_and_cleared(run, db, server):
    fail, locked = server
    run("user", "add", "bob@example.test")
    for _ in range(3):
        fail("bob@example.test", "192.0.2.1")
    _, out, _ = run("lockout", "list")
    assert [row.split()[:3] for row in out.splitlines()[1:]] == [
        ["account", "bob@example.test", "3"],
        ["ip", "192.0.2.1", "3"],
    ]
    status, out, err = run("user", "unlock", "bob@example.test")
    assert status == 0 and "1 lockout record cleared" in out
    assert "client 192.0.2.1 is still locked out" in err
    assert locked("bob@example.test", "192.0.2.1").kind == "ip"  # what the warning says
    assert locked("bob@example.test", "198.51.100.7") is None
    assert run("lockout", "clear", "--ip", "192.0.2.1")[0] == 0
    assert locked("bob@example.test", "192.0.2.1") is None


def test_key_formats_match_the_lockout_policy():
    assert IP_PREFIX == policy_lockout.IP_PREFIX
    key = policy_lockout.ip_key(" 2001:DB8::1 ")
    assert key.startswith(IP_PREFIX) and same_client(key[len(IP_PREFIX) :], "2001:db8::1")
    assert policy_lockout.account_key(" Bob@Example.TEST ") == "bob@example.test"
