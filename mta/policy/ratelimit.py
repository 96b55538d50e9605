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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

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


@implementer(IPolicyCheck)
class RateLimitCheck:
    """MAIL: one token per transaction from `limiter`, keyed by the client address
    (`per="ip"`, check name `rate-ip`) or the authenticated user (`per="user"`,
    `rate-user`; unauthenticated sessions are not counted)."""

    phases = (Phase.MAIL,)

    def __init__(self, limiter: RateLimiter, per: str):
        if per not in ("ip", "user"):
            raise ValueError("per must be 'ip' or 'user'")
        self.limiter = limiter
        self._per_user = per == "user"
        self.name = f"rate-{per}"

    def check(self, phase: Phase, context: PolicyContext) -> Verdict:
        if self._per_user:
            key = context.authenticated_as
            if not key:
                return Verdict.ACCEPT
        else:
            key = context.client_address
        return Verdict.ACCEPT if self.limiter.allow(key) else _RATE_LIMITED
