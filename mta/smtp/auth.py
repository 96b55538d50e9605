"""SMTP AUTH: the Argon2id credentials checker and the authenticator the session calls.

`Argon2idChecker` is a twisted.cred `ICredentialsChecker` for `IUsernamePassword`
over the users table.  A verify costs ~200 ms and `memory_cost` KiB, so it runs only
on the dedicated auth thread pool (`[auth] threads`), and at most `max_pending`
verifies wait for it: beyond that a login gets a temporary failure instead of
queueing without bound (an attacker cannot pile up work).  Unknown users, disabled
users and users without a password are verified against a dummy hash made with the
current parameters, so they cost the same as a wrong password.  A successful login
re-hashes the password when `[auth]` parameters changed since it was stored, and
records `last_login`.

`Authenticator` is what the session calls with the decoded SASL credentials: it
refuses locked accounts/addresses before any hashing (`mta.policy.lockout`), verifies,
counts the failure or resets the counter, writes the audit row (in the database
pool), and returns an `AuthResult` carrying the SMTP reply.  It never raises: a
database or checker error becomes 454 4.7.0.  Passwords, AUTH strings and hashes are
never logged.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from typing import Any

import attrs
from argon2.exceptions import InvalidHash, VerificationError
from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mta.auth.passwords import password_hasher
from mta.db import Database, fold
from mta.envelope import Reply
from mta.observe.logging import Logger
from mta.policy.lockout import LockoutTracker

log = Logger()

AUTH_SUCCESSFUL = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")

# Usernames longer than this are refused without a lookup (and stored truncated in
# the audit log).
MAX_USERNAME = 320


class AuthBusy(Exception):
    """More verifies are waiting than the checker accepts; a temporary failure."""


@attrs.frozen
class AuthResult:
    ok: bool
    username: str | None
    reply: Reply


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def normalise_username(value: bytes | str) -> str | None:
    """The lookup form of a login name, or None when it cannot be one."""
    try:
        text = fold(_text(value).strip())
    except UnicodeDecodeError:
        return None
    if not text or len(text) > MAX_USERNAME or "\x00" in text:
        return None
    return text


@implementer(ICredentialsChecker)
class Argon2idChecker:
    """`requestAvatarId(IUsernamePassword)` -> Deferred with the username (str).

    Fails with `UnauthorizedLogin` for wrong credentials, `AuthBusy` when the queue
    of verifies is full, and whatever the database raised for a database error.
    `db()` returns the open `Database` and is called in the auth pool's threads.
    `run_in_thread(f, *args)` -> Deferred runs `f` on the dedicated auth pool
    (the composition root builds it with `deferToThreadPool(reactor, auth_pool, ...)`).
    """

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def __init__(
        self,
        db: Callable[[], Database],
        run_in_thread: Callable[..., defer.Deferred],
        *,
        time_cost: int,
        memory_cost: int,
        parallelism: int,
        max_pending: int = 64,
    ):
        self._db = db
        self._run = run_in_thread
        self.hasher = password_hasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )
        self._max_pending = max_pending
        self.pending = 0
        self._dummy: str | None = None
        self._dummy_lock = threading.Lock()

    @classmethod
    def from_config(
        cls, auth: Any, db: Callable[[], Database], run_in_thread: Callable[..., defer.Deferred]
    ) -> Argon2idChecker:
        return cls(
            db,
            run_in_thread,
            time_cost=auth.time_cost,
            memory_cost=auth.memory_cost,
            parallelism=auth.parallelism,
            max_pending=max(16, auth.threads * 16),
        )

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        username = normalise_username(credentials.username)
        if self.pending >= self._max_pending:
            return defer.fail(AuthBusy(f"{self.pending} AUTH verifies already waiting"))
        self.pending += 1
        d = self._run(self._verify, username, credentials.password)

        def done(result: Any) -> Any:
            self.pending -= 1
            return result

        d.addBoth(done)
        return d

    # -- in the auth pool ----------------------------------------------------

    def _dummy_hash(self) -> str:
        with self._dummy_lock:
            if self._dummy is None:
                self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
            return self._dummy

    def _verify(self, username: str | None, password: bytes | str) -> str:
        user = None
        if username is not None:
            user = self._db().get_user(username)
        if user is None or not user.can_login:
            self._check(self._dummy_hash(), password)
            raise UnauthorizedLogin("no such user, or login disabled")
        if not self._check(user.password_hash, password):
            raise UnauthorizedLogin("wrong password")
        db = self._db()
        with db.transaction():
            if self.hasher.check_needs_rehash(user.password_hash):
                if db.replace_password_hash(
                    user.username, user.password_hash, self.hasher.hash(password)
                ):
                    log.info(
                        "password hash of {user} upgraded to the current parameters",
                        event="auth_rehash",
                        user=user.username,
                    )
            db.record_login(user.username)
        return user.username

    def _check(self, password_hash: str, password: bytes | str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except VerificationError:
            return False
        except InvalidHash:
            log.warn("a stored password hash is not a valid Argon2 hash", event="auth_bad_hash")
            return False


@attrs.frozen
class AuditEntry:
    action: str
    username: str | None
    success: bool
    ip_address: str | None
    details: dict[str, Any]


class AuditLog:
    """Writes `audit_log` rows through `run_in_thread` (the database pool)."""

    def __init__(self, db: Callable[[], Database], run_in_thread: Callable[..., defer.Deferred]):
        self._db = db
        self._run = run_in_thread

    def record(self, entry: AuditEntry) -> defer.Deferred:
        """Deferred firing (with None) once the row is committed; never fails: a
        database error is logged."""
        d = self._run(
            lambda: self._db().record_audit(
                entry.action,
                entry.username,
                success=entry.success,
                ip_address=entry.ip_address,
                details=entry.details,
            )
        )
        d.addErrback(
            lambda f: log.failure("writing audit row {action} failed", f, action=entry.action)
        )
        d.addCallback(lambda _: None)
        return d


class Authenticator:
    """`authenticate(username, password, client_ip, listener)` -> Deferred[AuthResult].

    Built once by the composition root and shared by every listener's sessions.
    """

    def __init__(self, checker: Any, lockouts: LockoutTracker, audit: AuditLog, clock: Any):
        self._checker = checker
        self._lockouts = lockouts
        self._audit = audit
        self._clock = clock

    def authenticate(
        self,
        username: bytes | str,
        password: bytes | str,
        client_ip: str,
        listener: str,
        *,
        mechanism: str | None = None,
    ) -> defer.Deferred:
        return defer.ensureDeferred(
            self._authenticate(username, password, client_ip, listener, mechanism)
        )

    async def _authenticate(
        self,
        username: bytes | str,
        password: bytes | str,
        client_ip: str,
        listener: str,
        mechanism: str | None,
    ) -> AuthResult:
        name = normalise_username(username)
        shown = name or _shown(username)
        details: dict[str, Any] = {"listener": listener}
        if mechanism:
            details["mechanism"] = mechanism
        started = self._clock.seconds()

        def event(outcome: str, **fields: Any) -> None:
            log.info(
                "AUTH {outcome} for {user} from {client} on {listener}",
                event="auth",
                outcome=outcome,
                # The metric's label: success, failure or locked.
                result=(
                    "success"
                    if outcome == "success"
                    else "locked"
                    if fields.get("reason") == "locked"
                    else "failure"
                ),
                user=shown,
                client=client_ip,
                listener=listener,
                duration=round(self._clock.seconds() - started, 6),
                **fields,
            )

        async def audit(action: str, success: bool, **extra: Any) -> None:
            await self._audit.record(
                AuditEntry(action, shown, success, client_ip, {**details, **extra})
            )

        async def temporary(reason: str = "temporary") -> AuthResult:
            await audit("auth.failure", False, reason=reason)
            return AuthResult(False, None, AUTH_TEMPORARY)

        async def locked(lockout) -> AuthResult:
            event("refused", reason="locked", locked=lockout.kind)
            await audit("auth.failure", False, reason="locked", locked=lockout.kind)
            return AuthResult(False, None, AUTH_LOCKED)

        try:
            lockout = await self._lockouts.check(shown, client_ip)
        except Exception:
            log.failure("AUTH lockout check failed for {user}", user=shown)
            return await temporary()
        if lockout is not None:
            return await locked(lockout)

        try:
            avatar = await self._checker.requestAvatarId(
                cred_credentials.UsernamePassword(_bytes(username), _bytes(password))
            )
        except UnauthorizedLogin:
            return await self._failed(shown, client_ip, event, audit)
        except AuthBusy:
            event("busy")
            return await temporary("busy")
        except Exception:
            log.failure("AUTH verification failed for {user}", user=shown)
            return await temporary()

        try:
            lockout = await self._lockouts.record_success(avatar, client_ip)
        except Exception:
            log.failure("AUTH success could not be recorded for {user}", user=avatar)
            return await temporary()
        if lockout is not None:
            return await locked(lockout)
        event("success")
        await audit("auth.success", True)
        return AuthResult(True, avatar, AUTH_SUCCESSFUL)

    async def _failed(self, shown: str, client_ip: str, event, audit) -> AuthResult:
        event("failure", reason="invalid")
        try:
            started = await self._lockouts.record_failure(shown, client_ip)
        except Exception:
            log.failure("AUTH failure could not be recorded for {user}", user=shown)
            started = []
        await audit("auth.failure", False, reason="invalid")
        for lockout in started:
            await audit(
                "auth.lockout",
                False,
                locked=lockout.kind,
                key=lockout.key,
                locked_until=lockout.locked_until,
            )
        return AuthResult(False, None, AUTH_INVALID)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def _shown(value: bytes | str) -> str:
    """A printable, bounded form of a username that is not a valid one."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.strip()[:MAX_USERNAME].replace("\x00", "\\0") or "(empty)"
