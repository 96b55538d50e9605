"""AUTH lockouts per account and per client address, persisted in mta.db."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from mta.db import AuthFailure, Database
from mta.policy.lockout import Lockout, LockoutRules, LockoutTracker, ip_key

RULES = LockoutRules(max_failures=3, failure_window=60.0, lockout_seconds=300.0)


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1_000_000)
    return c


@pytest.fixture
def db(tmp_path, clock):
    with Database(str(tmp_path / "mta.db"), clock=clock.seconds) as database:
        database.add_user("alice@example.test", "x")
        yield database


def tracker(db, clock, rules=RULES, **kw):
    return LockoutTracker(lambda: db, inline, clock, rules, **kw)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def fail(t, user, ip, n=1):
    started = []
    for _ in range(n):
        started += result(t.record_failure(user, ip))
    return started


# -- the rules (pure) -----------------------------------------------------------


def test_rules_count_within_window_then_lock():
    r = RULES
    rec = r.after_failure(None, "k", 0.0)
    assert rec == AuthFailure("k", 1, 0.0, None)
    rec = r.after_failure(rec, "k", 10.0)
    rec = r.after_failure(rec, "k", 20.0)
    assert rec == AuthFailure("k", 3, 0.0, 320.0)


def test_rules_window_expiry_restarts_the_count():
    rec = RULES.after_failure(None, "k", 0.0)
    rec = RULES.after_failure(rec, "k", 30.0)
    rec = RULES.after_failure(rec, "k", 61.0)
    assert rec == AuthFailure("k", 1, 61.0, None)


def test_rules_zero_never_locks():
    rules = LockoutRules(0, 60.0, 300.0)
    rec = None
    for i in range(100):
        rec = rules.after_failure(rec, "k", float(i))
    assert rec.locked_until is None


# -- the tracker -------------------------------------------------------------------


def test_account_locks_after_max_failures_and_unlocks_after_lockout(db, clock):
    t = tracker(db, clock)
    assert fail(t, "alice@example.test", "192.0.2.1", 2) == []
    assert result(t.check("alice@example.test", "192.0.2.9")) is None
    started = fail(t, "Alice@Example.test", "192.0.2.2")
    assert [(s.kind, s.key) for s in started] == [("account", "alice@example.test")]
    lock = result(t.check("alice@example.test", "198.51.100.7"))
    assert lock == Lockout("alice@example.test", "account", clock.seconds() + 300)
    clock.advance(299)
    assert result(t.check("alice@example.test", "198.51.100.7")) is not None
    clock.advance(1)
    assert result(t.check("alice@example.test", "198.51.100.7")) is None
    # After the lockout a fresh window starts: one failure does not lock again.
    assert fail(t, "alice@example.test", "198.51.100.7") == []
    assert result(t.check("alice@example.test", "198.51.100.7")) is None


def test_ip_locks_across_accounts(db, clock):
    t = tracker(db, clock)
    started = []
    for i in range(3):
        started += fail(t, f"user{i}@example.test", "203.0.113.5")
    assert [s.kind for s in started] == ["ip"]
    assert result(t.check("anyone@example.test", "203.0.113.5")).kind == "ip"
    assert result(t.check("anyone@example.test", "203.0.113.6")) is None


def test_failures_outside_the_window_do_not_add_up(db, clock):
    t = tracker(db, clock)
    for _ in range(10):
        fail(t, "alice@example.test", "192.0.2.1", 2)
        clock.advance(61)
    assert result(t.check("alice@example.test", "192.0.2.1")) is None


def test_success_resets_the_account_but_not_the_address(db, clock):
    t = tracker(db, clock)
    fail(t, "alice@example.test", "192.0.2.1", 2)
    assert result(t.record_success("alice@example.test", "192.0.2.1")) is None
    assert set(db.auth_failures(["alice@example.test", ip_key("192.0.2.1")])) == {
        ip_key("192.0.2.1")
    }
    # Two more failures do not lock the account (counter was reset) ...
    fail(t, "alice@example.test", "192.0.2.8", 2)
    assert result(t.check("alice@example.test", "192.0.2.8")) is None
    # ... but the address of the earlier failures is one away from its lockout.
    assert [s.kind for s in fail(t, "bob@example.test", "192.0.2.1")] == ["ip"]


def test_state_survives_a_restart(tmp_path, clock):
    path = str(tmp_path / "restart.db")
    with Database(path, clock=clock.seconds) as db:
        fail(tracker(db, clock), "alice@example.test", "192.0.2.1", 3)
    with Database(path, clock=clock.seconds) as db:
        assert result(tracker(db, clock).check("alice@example.test", "10.0.0.1")).kind == (
            "account"
        )


def test_check_answers_from_the_cache(db, clock):
    calls = []

    def counting(f, *args):
        calls.append(f)
        return inline(f, *args)

    t = LockoutTracker(lambda: db, counting, clock, RULES)
    result(t.check("alice@example.test", "192.0.2.1"))
    assert len(calls) == 1
    for _ in range(10):
        assert result(t.check("alice@example.test", "192.0.2.1")) is None
    assert len(calls) == 1
    clock.advance(61)  # cache_ttl
    result(t.check("alice@example.test", "192.0.2.1"))
    assert len(calls) == 2


def test_unlock_by_mta_admin_takes_effect_after_recheck_interval(db, clock):
    t = tracker(db, clock, recheck_interval=5.0)
    fail(t, "alice@example.test", "192.0.2.1", 3)
    assert result(t.check("alice@example.test", "192.0.2.2")) is not None
    assert db.clear_auth_failures("alice@example.test") == 1  # what `user unlock` does
    clock.advance(5)
    assert result(t.check("alice@example.test", "192.0.2.2")) is None


def test_success_is_refused_when_another_process_locked(db, clock):
    t = tracker(db, clock)
    assert result(t.check("alice@example.test", "192.0.2.1")) is None  # cached: unlocked
    other = tracker(db, clock)  # another worker process
    fail(other, "alice@example.test", "198.51.100.1", 3)
    lock = result(t.record_success("alice@example.test", "192.0.2.1"))
    assert lock is not None and lock.kind == "account"
    assert db.auth_failures(["alice@example.test"])["alice@example.test"].failures == 3
    assert result(t.check("alice@example.test", "192.0.2.1")) is not None


def test_failures_from_two_processes_add_up(db, clock):
    a, b = tracker(db, clock), tracker(db, clock)
    fail(a, "alice@example.test", "192.0.2.1")
    fail(b, "alice@example.test", "192.0.2.2")
    assert [s.kind for s in fail(a, "alice@example.test", "192.0.2.3")] == ["account"]


def test_cache_is_bounded(db, clock):
    t = tracker(db, clock, max_cached=50)
    for i in range(500):
        result(t.check(f"u{i}@example.test", f"10.0.{i // 256}.{i % 256}"))
    assert len(t._cache) <= 50


def test_disabled_lockouts_touch_nothing(db, clock):
    def boom(f, *args):
        raise AssertionError("no database work expected")

    t = LockoutTracker(lambda: db, boom, clock, LockoutRules(0, 60, 60))
    assert result(t.check("a@example.test", "192.0.2.1")) is None
    assert result(t.record_failure("a@example.test", "192.0.2.1")) == []
    assert result(t.record_success("a@example.test", "192.0.2.1")) is None


def test_purge_removes_expired_rows_only(db, clock):
    t = tracker(db, clock)
    fail(t, "alice@example.test", "192.0.2.1", 3)  # locked for 300 s
    fail(t, "bob@example.test", "192.0.2.9")
    clock.advance(200)
    assert result(t.purge()) == 2  # bob and 192.0.2.9: window over, never locked
    left = db.auth_failures(["alice@example.test", ip_key("192.0.2.1")])
    assert set(left) == {"alice@example.test", ip_key("192.0.2.1")}
    clock.advance(200)
    assert result(t.purge()) == 2


def test_service_purges_periodically(db, clock):
    t = tracker(db, clock)
    fail(t, "bob@example.test", "192.0.2.9")
    t.startService()
    clock.advance(60)  # every max(window, 60 s); rows whose window ended go
    clock.advance(60)
    assert db.auth_failures(["bob@example.test"]) == {}
    t.stopService()


def test_account_keys_fold_nfc_and_case_like_the_users_table():
    from mta.policy.lockout import account_key
    from mta.smtp.auth import normalise_username

    nfc, nfd = "Jos\u00e9@Example.Test", "jose\u0301@example.test"
    assert account_key(nfc) == account_key(nfd) == "jos\u00e9@example.test"
    assert normalise_username(nfd.encode()) == normalise_username(nfc) == "jos\u00e9@example.test"
