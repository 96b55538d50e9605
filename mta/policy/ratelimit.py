"""Message rate limits per client address and per authenticated user (token buckets).

Each key has a bucket of `limit_per_minute` tokens refilled continuously at
`limit_per_minute / 60` per second; a message takes one token, and an empty bucket
means the session answers `RATE_LIMITED` (451 4.7.1, a temporary failure the
client retries later).  Memory is bounded: a bucket that has refilled completely
carries no information and is evicted (buckets are kept in least-recently-used
order, so eviction only looks at the front), and at most `max_keys` buckets exist at
all (the least recently used one is dropped first, which only ever forgives).
`limit_per_minute` 0 turns the limiter off.  Time comes from the injected clock.
`RateLimitCheck` applies a limiter at MAIL, keyed by client address or by user.

Those buckets live in one process.  When the database is PostgreSQL (`[database]
dsn`: several nodes behind a load balancer) the limit has to hold for the cluster,
or a sender spreading over three nodes gets three times the rate: the buckets then
live in the database (`SharedRateLimiter` over `RateBuckets`, `mta.db.ratelimits`),
one atomic upsert per MAIL on the database pool.  The rate checks fail closed, so
while the database is unreachable MAIL answers 451 (as everything else does then).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from zope.interface import implementer

from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.policy.verdict import Phase, PolicyContext, Verdict

RATE_LIMITED = Reply(451, "4.7.1", "Error: too many messages, slow down and try again later")
_RATE_LIMITED = Verdict.tempfail(RATE_LIMITED)


class RateLimiter:
    """`allow(key)` -> bool: take one token from `key`'s bucket if there is one."""

    def __init__(self, clock: Any, limit_per_minute: int, *, max_keys: int = 100_000):
        if limit_per_minute < 0:
            raise ValueError("limit_per_minute must not be negative")
        self._clock = clock
        self.limit = limit_per_minute
        self._rate = limit_per_minute / 60.0
        self._max_keys = max_keys
        # key -> (tokens, updated_at), least recently used first
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Any) -> bool:
        if not self.limit:
            return True
        now = self._clock.seconds()
        self._evict_idle(now)
        tokens, updated = self._buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - updated) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def _evict_idle(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key, (tokens, updated) = next(iter(buckets.items()))
            if tokens + (now - updated) * self._rate < self.limit:
                return
            del buckets[key]


class RateBuckets(service.Service):
    """The database's token buckets (`db()` opens it in a pool thread, `run(f, *args)`
    runs blocking work there) and, as a service, a purge of buckets that are full
    again every `purge_interval` seconds."""

    name = "rate-buckets"

    def __init__(self, db: Callable[[], Any], run, clock, *, purge_interval: float = 300.0):
        self._db = db
        self._run = run
        self._clock = clock
        self._interval = purge_interval
        self._loop: task.LoopingCall | None = None

    def take(self, key: str, limit: float, per_second: float) -> defer.Deferred:
        now = self._clock.seconds()
        return self._run(lambda: self._db().take_token(key, limit, per_second, now))

    def purge(self) -> defer.Deferred:
        """Forget buckets untouched for two minutes: a bucket refills completely in
        one (the limits are per minute), so they carry no information."""
        before = self._clock.seconds() - 120.0
        return self._run(lambda: self._db().purge_rate_buckets(before))

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._purge_quietly)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _purge_quietly(self) -> defer.Deferred:
        return self.purge().addErrback(lambda f: None)  # next time; nothing depends on it


class SharedRateLimiter:
    """`allow(key)` -> Deferred[bool], from the database's bucket of `key` (`prefix`
    tells the per-IP and per-user limits apart in the one table)."""

    def __init__(self, buckets: RateBuckets, limit_per_minute: int, prefix: str):
        if limit_per_minute < 0:
            raise ValueError("limit_per_minute must not be negative")
        self.buckets = buckets
        self.limit = limit_per_minute
        self._rate = limit_per_minute / 60.0
        self._prefix = prefix

    def allow(self, key: Any) -> bool | defer.Deferred:
        if not self.limit:
            return True
        return self.buckets.take(f"{self._prefix}:{key}", float(self.limit), self._rate)


def _verdict(allowed: bool) -> Verdict:
    return Verdict.ACCEPT if allowed else _RATE_LIMITED


@implementer(IPolicyCheck)
class RateLimitCheck:
    """MAIL: one token per transaction from `limiter`, keyed by the client address
    (`per="ip"`, check name `rate-ip`) or the authenticated user (`per="user"`,
    `rate-user`; unauthenticated sessions are not counted)."""

    phases = (Phase.MAIL,)

    def __init__(self, limiter: RateLimiter | SharedRateLimiter, per: str):
        if per not in ("ip", "user"):
            raise ValueError("per must be 'ip' or 'user'")
        self.limiter = limiter
        self._per_user = per == "user"
        self.name = f"rate-{per}"

    def check(self, phase: Phase, context: PolicyContext) -> Verdict | defer.Deferred:
        if self._per_user:
            key = context.authenticated_as
            if not key:
                return Verdict.ACCEPT
        else:
            key = context.client_address
        allowed = self.limiter.allow(key)
        if isinstance(allowed, defer.Deferred):
            return allowed.addCallback(_verdict)
        return Verdict.ACCEPT if allowed else _RATE_LIMITED
