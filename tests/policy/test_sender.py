"""Which MAIL FROM addresses an authenticated user may use."""

from __future__ import annotations

import sqlite3

import pytest
from twisted.internet import defer

from mta.db import Database
from mta.envelope import NULL_ADDRESS, Address
from mta.policy.sender import SENDER_NOT_OWNED, SenderPolicy

DOMAINS = ("example.test",)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def db(tmp_path):
    with Database(str(tmp_path / "mta.db")) as database:
        database.add_user("alice@example.test", "h")
        database.add_user("bob@example.test", "h")
        database.add_user("robot@example.test", "h")
        database.add_alias("sales@example.test", ["alice@example.test", "carol@remote.test"])
        database.add_alias("team@example.test", ["Bob@Example.test"])
        yield database


@pytest.fixture
def calls():
    return []


@pytest.fixture
def policy(db, calls):
    def run(f, *args):
        calls.append(f)
        return defer.maybeDeferred(f, *args)

    return SenderPolicy(lambda: db, run)


def check(policy, user, address):
    return result(policy.check(user, address))


def test_reply():
    assert str(SENDER_NOT_OWNED) == "553 5.7.1 Sender address not owned by user"


def test_own_address_and_null_sender_need_no_lookup(policy, calls):
    assert check(policy, "alice@example.test", Address("Alice", "example.test")) is None
    assert check(policy, "alice@example.test", NULL_ADDRESS) is None
    assert calls == []


def test_alias_whose_targets_include_the_user(policy):
    assert check(policy, "alice@example.test", Address("sales", "example.test")) is None
    assert check(policy, "bob@example.test", Address("team", "example.test")) is None
    assert check(policy, "bob@example.test", Address("sales", "example.test")) == SENDER_NOT_OWNED


def test_someone_elses_address_is_refused(policy):
    assert check(policy, "alice@example.test", Address("bob", "example.test")) == SENDER_NOT_OWNED
    assert check(policy, "alice@example.test", Address("ceo", "bank.test")) == SENDER_NOT_OWNED


def test_send_as_any_flag(db, policy):
    anywhere = Address("noreply", "other.test")
    assert check(policy, "robot@example.test", anywhere) == SENDER_NOT_OWNED
    db.set_send_as_any("robot@example.test", True)
    assert db.send_as_any("robot@example.test")
    assert check(policy, "robot@example.test", anywhere) is None
    db.set_send_as_any("robot@example.test", False)
    assert check(policy, "robot@example.test", anywhere) == SENDER_NOT_OWNED


def test_disabled_user_loses_send_as_any(db, policy):
    db.set_send_as_any("robot@example.test", True)
    db.set_enabled("robot@example.test", False)
    assert check(policy, "robot@example.test", Address("x", "other.test")) == SENDER_NOT_OWNED


def test_database_error_fails_the_deferred(db, policy):
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        check(policy, "alice@example.test", Address("sales", "example.test"))


# -- mta-admin -----------------------------------------------------------------------

CLI_CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test"]
postmaster = "robot@example.test"
"""


@pytest.fixture
def admin(tmp_path, monkeypatch, capsys):
    from mta.admin import cli

    path = tmp_path / "mta.toml"
    path.write_text(CLI_CONFIG)
    monkeypatch.delenv("MTA_CONFIG", raising=False)

    def run(*argv):
        status = cli.main(["--config", str(path), *argv])
        return (status, *capsys.readouterr())

    assert run("user", "add", "robot@example.test", "--no-password")[0] == 0
    return run, str(tmp_path / "data" / "mta.db")


def test_mta_admin_set_send_as(admin):
    run, path = admin
    status, out, _ = run("user", "set-send-as", "Robot@example.test", "any")
    assert status == 0 and "any address" in out
    with Database(path) as db:
        assert db.send_as_any("robot@example.test")
        entry = db.audit_entries()[-1]
        assert (entry.action, entry.username, entry.details["scope"]) == (
            "user.send_as",
            "robot@example.test",
            "any",
        )
    assert run("user", "set-send-as", "robot@example.test", "own")[0] == 0
    with Database(path) as db:
        assert not db.send_as_any("robot@example.test")
    status, _, err = run("user", "set-send-as", "nobody@example.test", "any")
    assert status == 1 and "no such user" in err and "Traceback" not in err


def test_mta_admin_unlock_clears_account_and_address_lockouts(admin):
    from twisted.internet import task

    from mta.policy.lockout import LockoutRules, LockoutTracker

    run, path = admin
    clock = task.Clock()
    with Database(path) as db:
        tracker = LockoutTracker(
            lambda: db, lambda f, *a: defer.maybeDeferred(f, *a), clock, LockoutRules(2, 60, 600)
        )
        for _ in range(2):
            result(tracker.record_failure("robot@example.test", "192.0.2.7"))
        assert len(db.auth_failures(["robot@example.test", "ip:192.0.2.7"])) == 2
    status, out, _ = run("user", "unlock", "robot@example.test", "--ip", "192.0.2.7")
    assert status == 0 and "2 lockout records cleared" in out
    with Database(path) as db:
        assert db.auth_failures(["robot@example.test", "ip:192.0.2.7"]) == {}
        fresh = LockoutTracker(
            lambda: db, lambda f, *a: defer.maybeDeferred(f, *a), clock, LockoutRules(2, 60, 600)
        )
        assert result(fresh.check("robot@example.test", "192.0.2.7")) is None
