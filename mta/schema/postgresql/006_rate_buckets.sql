-- As mta/schema/006_rate_buckets.sql: message rate limits shared by every node.
CREATE TABLE rate_buckets (
    key TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
CREATE INDEX rate_buckets_by_updated ON rate_buckets (updated);
