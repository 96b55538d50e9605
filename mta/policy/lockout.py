"""AUTH lockouts: failures counted per account and per client IP, kept in mta.db.

After `max_failures` failed AUTH attempts within `failure_window` seconds, a key (an
account, or a client address) is locked for `lockout_seconds`: every attempt on it is
refused before any password hashing, whatever the password.  Records live in the
`auth_failures` table, so reconnecting or restarting the daemon resets nothing, and
`mta-admin user unlock EMAIL` deletes the account's record.

Keys: the account key is the lower-cased username itself (the form
`Database.clear_auth_failures` clears, with any `username|...` qualifiers); the
client key is `ip:<address>` (a username always contains "@", so the two never meet).

Success resets the *account* counter only.  The client-address counter is left alone
on purpose: otherwise an attacker holding one valid account could log in with it
between guesses and reset the counter of their address forever, guessing other
accounts' passwords at full speed.  It expires with its window like any other.

The cache: `check` answers from memory when it has a fresh entry, so the common case
(nothing locked, entry loaded) costs no thread hop.  The database stays the authority:

- every failure is a read-modify-write of the row in one write transaction, so
  counts are shared by all worker processes (and by a restart);
- a success re-reads both rows in that transaction and is refused if either is
  locked there (another worker may have locked it a moment ago);
- a cached lockout is re-read at most every `recheck_interval` seconds, so `mta-admin
  user unlock` takes effect within that time; other entries are re-read after
  `cache_ttl`.  The cache holds at most `max_cached` keys (oldest loaded dropped first).

All database work runs through `run_in_thread` (the composition root's database pool);
time comes from the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task

from mta.db import AuthFailure, Database, fold
from mta.observe.logging import Logger

log = Logger()

IP_PREFIX = "ip:"


def account_key(username: str) -> str:
    """NFC and lower-case, as the users table stores names (mta.db.fold)."""
    return fold(username.strip())


def ip_key(client_ip: str) -> str:
    return IP_PREFIX + client_ip.strip().lower()


@attrs.frozen
class LockoutRules:
    """The [auth] numbers; `max_failures` 0 turns lockouts off."""

    max_failures: int = 5
    failure_window: float = 900.0
    lockout_seconds: float = 900.0

    @classmethod
    def from_config(cls, auth: Any) -> LockoutRules:
        return cls(auth.max_failures, auth.failure_window, auth.lockout_seconds)

    def after_failure(self, record: AuthFailure | None, key: str, now: float) -> AuthFailure:
        """The record once one more failure happened at `now` (pure)."""
        if record is None or _window_over(record, now, self):
            return self._locked_if_due(AuthFailure(key, 1, now, None), now)
        if is_locked(record, now):
            return record  # attempts on a locked key never reach a verify
        return self._locked_if_due(attrs.evolve(record, failures=record.failures + 1), now)

    def _locked_if_due(self, record: AuthFailure, now: float) -> AuthFailure:
        if self.max_failures and record.failures >= self.max_failures:
            return attrs.evolve(record, locked_until=now + self.lockout_seconds)
        return record


def is_locked(record: AuthFailure | None, now: float) -> bool:
    return record is not None and record.locked_until is not None and now < record.locked_until


def _window_over(record: AuthFailure, now: float, rules: LockoutRules) -> bool:
    """A record that no longer counts: its lockout ended, or (never locked) its
    window passed."""
    if record.locked_until is not None:
        return now >= record.locked_until
    return now - record.first_failure >= rules.failure_window


@attrs.frozen
class Lockout:
    """A refusal: which key is locked and until when."""

    key: str
    kind: str  # "account" | "ip"
    locked_until: float


@attrs.define
class _Entry:
    record: AuthFailure | None
    loaded_at: float


class LockoutTracker(service.Service):
    """Per-account and per-IP AUTH failure tracking.

    `db()` returns the open `Database` (called in a pool thread only);
    `run_in_thread(f, *args)` -> Deferred runs blocking work off the reactor.
    As a service it purges expired rows every `failure_window` seconds.
    """

    name = "auth-lockouts"

    def __init__(
        self,
        db: Callable[[], Database],
        run_in_thread: Callable[..., defer.Deferred],
        clock: Any,
        rules: LockoutRules,
        *,
        recheck_interval: float = 5.0,
        cache_ttl: float = 60.0,
        max_cached: int = 100_000,
    ):
        self._db = db
        self._run = run_in_thread
        self._clock = clock
        self.rules = rules
        self._recheck = recheck_interval
        self._ttl = cache_ttl
        self._max_cached = max_cached
        self._cache: dict[str, _Entry] = {}
        self._purge: task.LoopingCall | None = None

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.rules.max_failures:
            self._purge = task.LoopingCall(self._purge_quietly)
            self._purge.clock = self._clock
            self._purge.start(max(self.rules.failure_window, 60.0), now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._purge is not None and self._purge.running:
            self._purge.stop()
        self._purge = None

    def _purge_quietly(self) -> defer.Deferred:
        d = self.purge()
        d.addErrback(lambda f: log.failure("purging expired AUTH failure records", f))
        return d

    def purge(self) -> defer.Deferred:
        """Delete expired records from the table (and forget the cache); Deferred
        with the number of rows deleted."""
        now = self._clock.seconds()
        window_start = now - self.rules.failure_window
        self._cache.clear()
        return self._run(lambda: self._db().purge_auth_failures(window_start=window_start, now=now))

    # -- queries -------------------------------------------------------------

    def check(self, username: str, client_ip: str) -> defer.Deferred:
        """Deferred with a `Lockout` when the account or the client address is
        locked, else None.  No thread hop when both entries are cached and fresh."""
        if not self.rules.max_failures:
            return defer.succeed(None)
        keys = (account_key(username), ip_key(client_ip))
        now = self._clock.seconds()
        stale = [k for k in keys if self._is_stale(k, now)]
        if not stale:
            return defer.succeed(self._lockout(keys, now))
        d = self._run(self._load, stale)
        d.addCallback(self._store, now)
        d.addCallback(lambda _: self._lockout(keys, self._clock.seconds()))
        return d

    def record_failure(self, username: str, client_ip: str) -> defer.Deferred:
        """Count one failure for the account and the address; Deferred with the list
        of `Lockout`s that started because of it (usually empty)."""
        if not self.rules.max_failures:
            return defer.succeed([])
        keys = (account_key(username), ip_key(client_ip))
        now = self._clock.seconds()
        d = self._run(self._fail, keys, now)
        d.addCallback(self._failed, keys, now)
        return d

    def record_success(self, username: str, client_ip: str) -> defer.Deferred:
        """Reset the account counter; Deferred with a `Lockout` instead when the
        database says the account or address is locked (locked by another process
        since the check), in which case nothing is reset and the login must fail."""
        if not self.rules.max_failures:
            return defer.succeed(None)
        keys = (account_key(username), ip_key(client_ip))
        now = self._clock.seconds()
        d = self._run(self._succeed, keys, now)
        d.addCallback(self._succeeded, keys, now)
        return d

    def forget(self, username: str | None = None, client_ip: str | None = None) -> None:
        """Drop cache entries (the database rows stay)."""
        if username is not None:
            self._cache.pop(account_key(username), None)
        if client_ip is not None:
            self._cache.pop(ip_key(client_ip), None)

    # -- in the thread pool ---------------------------------------------------

    def _load(self, keys: list[str]) -> dict[str, AuthFailure | None]:
        found = self._db().auth_failures(keys)
        return {k: found.get(k) for k in keys}

    def _fail(self, keys: Iterable[str], now: float) -> dict[str, tuple[bool, AuthFailure]]:
        db = self._db()
        out = {}
        with db.transaction():
            current = db.auth_failures(keys)
            for key in keys:
                before = current.get(key)
                after = self.rules.after_failure(before, key, now)
                if after != before:
                    db.put_auth_failure(after)
                started = is_locked(after, now) and not is_locked(before, now)
                out[key] = (started, after)
        return out

    def _succeed(self, keys: tuple[str, str], now: float) -> dict[str, AuthFailure | None]:
        db = self._db()
        account = keys[0]
        with db.transaction():
            current = db.auth_failures(keys)
            if not any(is_locked(r, now) for r in current.values()):
                if account in current:
                    db.delete_auth_failure(account)
                current.pop(account, None)
        return {k: current.get(k) for k in keys}

    # -- back on the reactor ----------------------------------------------------

    def _failed(self, result: dict[str, tuple[bool, AuthFailure]], keys, now: float) -> list:
        self._store({k: record for k, (_, record) in result.items()}, now)
        started = []
        for key in keys:
            new, record = result[key]
            if new:
                lockout = Lockout(key, _kind(key), record.locked_until)
                log.warn(
                    "AUTH lockout of {kind} {key} until {until} after {failures} failures",
                    event="auth_lockout",
                    kind=lockout.kind,
                    key=key,
                    until=record.locked_until,
                    failures=record.failures,
                )
                started.append(lockout)
        return started

    def _succeeded(self, result: dict[str, AuthFailure | None], keys, now: float):
        self._store(result, now)
        return self._lockout(keys, now)

    def _store(self, records: dict[str, AuthFailure | None], now: float) -> None:
        for key, record in records.items():
            self._cache.pop(key, None)
            self._cache[key] = _Entry(record, now)
        while len(self._cache) > self._max_cached:
            del self._cache[next(iter(self._cache))]

    def _is_stale(self, key: str, now: float) -> bool:
        entry = self._cache.get(key)
        if entry is None:
            return True
        age = now - entry.loaded_at
        if is_locked(entry.record, now):
            return age >= self._recheck
        return age >= self._ttl

    def _lockout(self, keys: Iterable[str], now: float) -> Lockout | None:
        for key in keys:
            entry = self._cache.get(key)
            record = entry.record if entry is not None else None
            if is_locked(record, now):
                return Lockout(key, _kind(key), record.locked_until)
        return None


def _kind(key: str) -> str:
    return "ip" if key.startswith(IP_PREFIX) else "account"
