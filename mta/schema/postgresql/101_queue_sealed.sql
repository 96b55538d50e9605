-- [queue] encrypt on the PostgreSQL queue (mta.queue.pgseal): the sealed body's
-- header (master key id, wrapped data key, nonce prefix; mta.crypto.stream) kept
-- apart from the body, NULL for a body stored in clear.  Re-wrapping for
-- `mta-admin key retire` rewrites this column alone, wherever the body lives.
ALTER TABLE queue_entries ADD COLUMN IF NOT EXISTS seal_header bytea;
