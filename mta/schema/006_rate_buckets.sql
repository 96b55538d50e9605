-- Message rate limits shared by every process and node (mta.db.ratelimits,
-- mta.policy.ratelimit.SharedRateLimiter): one token bucket per key ("ip:<address>",
-- "user:<name>"), updated by a single atomic upsert per message.  A bucket that has
-- refilled completely carries no information, so old rows are purged.
CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    tokens REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX rate_buckets_by_updated ON rate_buckets (updated);
