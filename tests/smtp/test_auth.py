"""Argon2id checker and Authenticator: replies, lockouts, audit rows, hash upgrades,
and the reactor staying responsive while verifies run on the auth thread pool."""

from __future__ import annotations

import threading

import argon2
import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task, threads
from twisted.python import threadable
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mta.db import Database
from mta.policy.lockout import LockoutRules, LockoutTracker
from mta.smtp.auth import (
    AUTH_INVALID,
    AUTH_LOCKED,
    AUTH_SUCCESSFUL,
    AUTH_TEMPORARY,
    Argon2idChecker,
    AuditLog,
    Authenticator,
    AuthResult,
)

FAST = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
RULES = LockoutRules(max_failures=3, failure_window=60.0, lockout_seconds=300.0)
PASSWORD = "correct horse"


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def hash_with(password: str, **params) -> str:
    return argon2.PasswordHasher(**{**FAST, **params}).hash(password)


class SpyHasher:
    """Wraps a PasswordHasher: counts verifies, their threads and their overlap."""

    def __init__(self, real: argon2.PasswordHasher):
        self._real = real
        self.gate: threading.Event | None = None  # when set: verifies wait for it
        self.verifies = 0
        self.on_reactor_thread = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def verify(self, h, password):
        with self._lock:
            self.verifies += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if threadable.isInIOThread():
                self.on_reactor_thread += 1
        try:
            if self.gate is not None:
                self.gate.wait(5)
            return self._real.verify(h, password)
        finally:
            with self._lock:
                self.active -= 1

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1_700_000_000)
    return c


@pytest.fixture
def db(tmp_path, clock):
    with Database(str(tmp_path / "mta.db"), clock=clock.seconds) as database:
        database.add_user("alice@example.test", hash_with(PASSWORD))
        database.add_user("bob@example.test", hash_with("bobs password"))
        database.add_user("nopass@example.test", None)
        database.add_user("off@example.test", hash_with(PASSWORD), enabled=False)
        yield database


def make_checker(db, run=inline, **params):
    checker = Argon2idChecker(lambda: db, run, **{**FAST, **params})
    checker.hasher = SpyHasher(checker.hasher)
    return checker


def make_auth(db, clock, checker=None, rules=RULES):
    checker = checker or make_checker(db)
    lockouts = LockoutTracker(lambda: db, inline, clock, rules)
    return Authenticator(checker, lockouts, AuditLog(lambda: db, inline), clock), checker


def login(auth, user, password, ip="192.0.2.1") -> AuthResult:
    return result(auth.authenticate(user, password, ip, "submission", mechanism="PLAIN"))


def actions(db):
    return [(e.action, e.username, e.success, e.ip_address) for e in db.audit_entries()]


# -- checker --------------------------------------------------------------------


def test_checker_provides_the_interface(db):
    checker = make_checker(db)
    assert verifyObject(ICredentialsChecker, checker)
    assert IUsernamePassword in checker.credentialInterfaces


def test_checker_accepts_the_right_password_and_updates_last_login(db, clock):
    checker = make_checker(db)
    assert db.get_user("alice@example.test").last_login is None
    avatar = result(
        checker.requestAvatarId(UsernamePassword(b"Alice@Example.TEST", b"correct horse"))
    )
    assert avatar == "alice@example.test"
    assert db.get_user("alice@example.test").last_login == clock.seconds()


@pytest.mark.parametrize(
    "user, password",
    [
        ("alice@example.test", "wrong"),
        ("nobody@example.test", PASSWORD),
        ("nopass@example.test", PASSWORD),
        ("off@example.test", PASSWORD),
        (b"\xff\xfe@example.test", PASSWORD),
        ("x" * 1000, PASSWORD),
    ],
)
def test_every_refusal_costs_exactly_one_verify(db, user, password):
    checker = make_checker(db)
    user = user if isinstance(user, bytes) else user.encode()
    with pytest.raises(UnauthorizedLogin):
        result(checker.requestAvatarId(UsernamePassword(user, password.encode())))
    assert checker.hasher.verifies == 1
    assert db.get_user("alice@example.test").last_login is None


def test_dummy_hash_uses_the_current_parameters(db):
    checker = make_checker(db, time_cost=2, memory_cost=16)
    with pytest.raises(UnauthorizedLogin):
        result(checker.requestAvatarId(UsernamePassword(b"nobody@example.test", b"x")))
    assert not checker.hasher.check_needs_rehash(checker._dummy)


def test_hash_is_upgraded_on_login_when_parameters_changed(db):
    old = db.get_user("alice@example.test").password_hash
    checker = make_checker(db, time_cost=2, memory_cost=16)
    assert checker.hasher.check_needs_rehash(old)
    result(checker.requestAvatarId(UsernamePassword(b"alice@example.test", PASSWORD.encode())))
    new = db.get_user("alice@example.test").password_hash
    assert new != old and not checker.hasher.check_needs_rehash(new)
    assert argon2.PasswordHasher().verify(new, PASSWORD)
    # The next login verifies against the new hash and leaves it alone.
    result(checker.requestAvatarId(UsernamePassword(b"alice@example.test", PASSWORD.encode())))
    assert db.get_user("alice@example.test").password_hash == new


def test_unchanged_parameters_do_not_rehash(db):
    old = db.get_user("alice@example.test").password_hash
    result(
        make_checker(db).requestAvatarId(UsernamePassword(b"alice@example.test", b"correct horse"))
    )
    assert db.get_user("alice@example.test").password_hash == old


def test_rehash_never_undoes_a_password_change_made_meanwhile(db):
    old = db.get_user("alice@example.test").password_hash
    db.set_password("alice@example.test", hash_with("new password"))
    assert not db.replace_password_hash("alice@example.test", old, hash_with(PASSWORD))
    assert argon2.PasswordHasher().verify(
        db.get_user("alice@example.test").password_hash, "new password"
    )


def test_queue_of_waiting_verifies_is_bounded(db, clock):
    held = []

    def hold(f, *args):
        d = defer.Deferred()
        held.append((d, f, args))
        return d

    checker = Argon2idChecker(lambda: db, hold, **FAST, max_pending=2)
    auth, _ = make_auth(db, clock, checker)
    first = auth.authenticate("alice@example.test", PASSWORD, "192.0.2.1", "smtps")
    auth.authenticate("bob@example.test", "x", "192.0.2.2", "smtps")
    third = result(auth.authenticate("alice@example.test", PASSWORD, "192.0.2.3", "smtps"))
    assert third.reply == AUTH_TEMPORARY and len(held) == 2
    for d, f, args in held:
        try:
            d.callback(f(*args))
        except UnauthorizedLogin as e:
            d.errback(e)
    assert result(first).ok and checker.pending == 0


# -- authenticator ------------------------------------------------------------------


def test_success_reply_and_audit_row(db, clock):
    auth, _ = make_auth(db, clock)
    r = login(auth, "alice@example.test", PASSWORD)
    assert r == AuthResult(True, "alice@example.test", AUTH_SUCCESSFUL)
    assert str(r.reply) == "235 2.7.0 Authentication successful"
    [entry] = db.audit_entries()
    assert (entry.action, entry.username, entry.success, entry.ip_address) == (
        "auth.success",
        "alice@example.test",
        True,
        "192.0.2.1",
    )
    assert entry.details == {"listener": "submission", "mechanism": "PLAIN"}
    assert entry.timestamp == clock.seconds()


def test_wrong_password_reply_and_audit_row(db, clock):
    auth, _ = make_auth(db, clock)
    r = login(auth, "alice@example.test", "nope")
    assert r == AuthResult(False, None, AUTH_INVALID)
    assert str(r.reply) == "535 5.7.8 Authentication credentials invalid"
    assert actions(db) == [("auth.failure", "alice@example.test", False, "192.0.2.1")]
    assert db.audit_entries()[0].details["reason"] == "invalid"


def test_audit_rows_never_contain_the_password(db, clock):
    auth, _ = make_auth(db, clock)
    for password in ("hunter2-secret", PASSWORD):
        login(auth, "alice@example.test", password)
    text = repr(db.audit_entries())
    assert "hunter2" not in text and PASSWORD not in text and "$argon2" not in text


def test_lockout_row_and_refusal_without_hashing(db, clock):
    auth, checker = make_auth(db, clock)
    for _ in range(3):
        assert login(auth, "alice@example.test", "nope").reply == AUTH_INVALID
    # Same account, same address: both reach max_failures, two lockouts start.
    assert [a[0] for a in actions(db)] == ["auth.failure"] * 3 + ["auth.lockout"] * 2
    account, address = db.audit_entries()[-2:]
    assert account.details["locked"] == "account" and account.username == "alice@example.test"
    assert address.details["locked"] == "ip" and address.details["key"] == "ip:192.0.2.1"
    verifies = checker.hasher.verifies
    r = login(auth, "alice@example.test", PASSWORD, ip="198.51.100.1")  # right password
    assert r == AuthResult(False, None, AUTH_LOCKED)
    assert str(r.reply) == "454 4.7.0 Too many failed authentication attempts, try again later"
    assert checker.hasher.verifies == verifies  # no hash work for a locked account
    assert db.audit_entries()[-1].details["reason"] == "locked"


def test_database_error_is_a_temporary_failure(db, clock):
    auth, _ = make_auth(db, clock)
    db.close()
    r = login(auth, "alice@example.test", PASSWORD)
    assert r == AuthResult(False, None, AUTH_TEMPORARY)
    assert (r.reply.code, r.reply.enhanced) == (454, "4.7.0")


def test_checker_database_error_is_a_temporary_failure(tmp_path, db, clock):
    def broken():
        raise OSError("disk on fire")

    checker = Argon2idChecker(broken, inline, **FAST)
    auth, _ = make_auth(db, clock, checker)
    assert login(auth, "alice@example.test", PASSWORD).reply == AUTH_TEMPORARY
    assert db.audit_entries()[-1].details["reason"] == "temporary"


def test_brute_force_one_address_many_accounts(db, clock):
    """An attacker at one address tries a password on many accounts."""
    auth, checker = make_auth(db, clock)
    for i in range(3):
        db.add_user(f"user{i}@example.test", hash_with(PASSWORD))
    replies = [
        login(auth, f"user{i % 3}@example.test", "guess", ip="203.0.113.66").reply
        for i in range(50)
    ]
    assert replies[:3] == [AUTH_INVALID] * 3 and set(replies[3:]) == {AUTH_LOCKED}
    assert checker.hasher.verifies == 3
    assert [a for a in actions(db) if a[0] == "auth.lockout"] == [
        ("auth.lockout", "user2@example.test", False, "203.0.113.66")
    ]
    assert db.audit_entries()[3].details["locked"] == "ip"
    # Even the right password of an unlocked account is refused from that address ...
    assert login(auth, "bob@example.test", "bobs password", ip="203.0.113.66").reply == AUTH_LOCKED
    # ... but not from another one, and the accounts themselves are not locked.
    assert login(auth, "user0@example.test", PASSWORD, ip="192.0.2.44").ok
    clock.advance(300)
    assert login(auth, "bob@example.test", "bobs password", ip="203.0.113.66").ok


def test_brute_force_one_account_many_addresses(db, clock):
    """A botnet tries passwords on one account from many addresses."""
    auth, checker = make_auth(db, clock)
    replies = [
        login(auth, "alice@example.test", f"guess{i}", ip=f"198.51.100.{i}").reply
        for i in range(40)
    ]
    assert replies[:3] == [AUTH_INVALID] * 3 and set(replies[3:]) == {AUTH_LOCKED}
    assert checker.hasher.verifies == 3
    # Reconnecting changes nothing; the right password is refused too while locked.
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.200").reply == AUTH_LOCKED
    assert login(auth, "bob@example.test", "bobs password", ip="198.51.100.1").ok
    clock.advance(299)
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.200").reply == AUTH_LOCKED
    clock.advance(1)
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.200").ok
    # The success reset the account: two new failures do not lock it again.
    login(auth, "alice@example.test", "x", ip="192.0.2.201")
    login(auth, "alice@example.test", "x", ip="192.0.2.202")
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.203").ok


def test_unlock_lifts_the_lockout(db, clock):
    auth, _ = make_auth(db, clock)
    for i in range(3):
        login(auth, "alice@example.test", "x", ip=f"198.51.100.{i}")
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.9").reply == AUTH_LOCKED
    db.clear_auth_failures("alice@example.test")  # mta-admin user unlock
    clock.advance(5)  # the cached lockout is re-read
    assert login(auth, "alice@example.test", PASSWORD, ip="192.0.2.9").ok


def test_lockout_survives_a_new_authenticator(db, clock):
    auth, _ = make_auth(db, clock)
    for i in range(3):
        login(auth, "alice@example.test", "x", ip=f"198.51.100.{i}")
    restarted, checker = make_auth(db, clock)
    assert login(restarted, "alice@example.test", PASSWORD).reply == AUTH_LOCKED
    assert checker.hasher.verifies == 0


# -- the real reactor and a real thread pool ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_reactor_stays_responsive_while_ten_verifies_run(db):
    """Ten AUTHs at once on a 2-thread pool: verifies never run on the reactor
    thread, never more than 2 at a time, and the reactor keeps turning while two
    are in progress (the verifies wait at a gate that only the reactor's tenth turn
    with both of them in flight opens: no timing involved)."""
    from twisted.internet import reactor

    pool = ThreadPool(minthreads=0, maxthreads=2, name="auth-test")
    pool.start()
    try:

        def run(f, *args):
            return threads.deferToThreadPool(reactor, pool, f, *args)

        checker = make_checker(db, run)
        db.set_password("alice@example.test", checker.hasher.hash(PASSWORD))
        # Five wrong passwords must not lock the account midway (a success finishing
        # after the third failure would be refused, depending on thread timing).
        auth, _ = make_auth(db, reactor, checker, rules=LockoutRules(100, 60.0, 300.0))
        spy = checker.hasher
        spy.gate = threading.Event()
        turns_while_both_wait = [0]

        def tick():
            if spy.active == 2:
                turns_while_both_wait[0] += 1
            if turns_while_both_wait[0] >= 10:
                spy.gate.set()
            else:
                reactor.callLater(0, tick)

        attempts = [
            auth.authenticate(
                "alice@example.test", PASSWORD if i % 2 else "wrong", f"192.0.2.{i}", "smtps"
            )
            for i in range(10)
        ]
        reactor.callLater(0, tick)
        outcomes = await defer.gatherResults(attempts)
        assert turns_while_both_wait[0] == 10  # the reactor, not the timeout, opened it
        assert [o.ok for o in outcomes] == [bool(i % 2) for i in range(10)]
        assert spy.verifies == 10 and spy.on_reactor_thread == 0
        assert spy.max_active <= 2
    finally:
        pool.stop()
