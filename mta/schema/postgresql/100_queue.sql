-- The PostgreSQL mail queue ([queue] backend = "postgresql"): mta.queue.pgstore.
-- Times are epoch seconds (double precision) from the node's injected clock, never
-- now(): leases and retry times are decided by the nodes, tested with a fake clock.

CREATE TABLE IF NOT EXISTS queue_entries (
    id            text PRIMARY KEY,
    envelope      jsonb NOT NULL,                -- mta.envelope.envelope_fields
    trace_headers bytea NOT NULL DEFAULT '\x',   -- Received: etc., sent before the body
    body_length   bigint NOT NULL,
    body_ref      text NOT NULL DEFAULT 'pg',    -- where the body is: 'pg' = queue_bodies
    size          bigint NOT NULL,               -- trace headers + body
    status        text NOT NULL DEFAULT 'active'
                  CHECK (status IN ('active', 'hold', 'dead')),
    attempts      integer NOT NULL DEFAULT 0,
    next_attempt  double precision NOT NULL,
    last_error    text NOT NULL DEFAULT '',
    dead_reason   text NOT NULL DEFAULT '',
    lease_owner   text,                          -- node id (hostname/pid/instance)
    lease_until   double precision,
    created       double precision NOT NULL,
    updated       double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_entries_due
    ON queue_entries (next_attempt) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS queue_entries_lease
    ON queue_entries (lease_owner) WHERE lease_owner IS NOT NULL;

-- One row per envelope recipient (position = index in envelope.recipients): a final
-- state (delivered, failed) is written once, right after the attempt that decided it.
CREATE TABLE IF NOT EXISTS queue_recipients (
    entry_id  text NOT NULL REFERENCES queue_entries (id) ON DELETE CASCADE,
    position  integer NOT NULL,
    recipient text NOT NULL,
    status    text NOT NULL DEFAULT 'pending'
              CHECK (status IN ('pending', 'deferred', 'delivered', 'failed')),
    result    text NOT NULL DEFAULT '',
    updated   double precision NOT NULL,
    PRIMARY KEY (entry_id, position)
);

-- Message bodies kept in PostgreSQL, in chunks of at most 1 MiB (bounded memory on
-- both sides); body_ref = 'pg'.  Bodies kept in S3 have no rows here.
CREATE TABLE IF NOT EXISTS queue_bodies (
    entry_id text NOT NULL REFERENCES queue_entries (id) ON DELETE CASCADE,
    seq      integer NOT NULL,
    data     bytea NOT NULL,
    PRIMARY KEY (entry_id, seq)
);

-- One row per running node (mta-admin cluster status).
CREATE TABLE IF NOT EXISTS queue_nodes (
    node_id   text PRIMARY KEY,
    hostname  text NOT NULL,
    pid       integer NOT NULL,
    version   text NOT NULL,
    started   double precision NOT NULL,
    last_seen double precision NOT NULL
);
