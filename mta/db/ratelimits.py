"""The `rate_buckets` table: message rate limits that hold across processes and nodes.

`mta.policy.ratelimit` decides (the token bucket); this module stores the buckets so
that every worker process and every node sharing the database draws from the same
one.  A token is taken with ONE statement, an upsert whose update only happens when
the refilled bucket holds a token, so two nodes racing for the last token cannot
both get it (the row lock of the upsert orders them) and no transaction spans a
round trip.  The refill is computed from the caller's clock: nodes' clocks should
agree to within a second or so (NTP), as they must for leases anyway.
"""

from __future__ import annotations

from mta.db.connection import Connection

# tokens after refilling (capped at the limit), written once and used three times
_REFILLED = "CASE WHEN {t} + (? - {u}) * ? > ? THEN ? ELSE {t} + (? - {u}) * ? END"
_TAKE = (
    "INSERT INTO rate_buckets (key, tokens, updated) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET"
    " tokens = " + _REFILLED.format(t="rate_buckets.tokens", u="rate_buckets.updated") + " - 1,"
    " updated = ?"
    " WHERE " + _REFILLED.format(t="rate_buckets.tokens", u="rate_buckets.updated") + " >= 1"
    " RETURNING tokens"
)


class RateBucketTable(Connection):
    def take_token(self, key: str, limit: float, per_second: float, now: float) -> bool:
        """Take one token from `key`'s bucket (`limit` tokens, refilled at
        `per_second`); False when it is empty."""
        refill = (now, per_second, limit, limit, now, per_second)
        with self.transaction(exclusive=False) as conn:
            row = conn.execute(_TAKE, (key, limit - 1.0, now, *refill, now, *refill)).fetchone()
        return row is not None

    def purge_rate_buckets(self, before: float) -> int:
        """Delete buckets untouched since `before` (full again by then); how many."""
        with self.transaction(exclusive=False) as conn:
            return conn.execute("DELETE FROM rate_buckets WHERE updated < ?", (before,)).rowcount
