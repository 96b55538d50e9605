-- Quotas (issue 13, mta.storage.quota): the bytes each mailbox holds, kept by local
-- delivery and `mta-admin mail delete` whatever the store.  `used_mb` (the seed's
-- column, what reports read) follows `used_bytes` rounded up to whole MiB: adding a
-- few kilobytes at a time to a whole-megabyte counter would never move it.
-- quota_mb is in MiB; NULL (or 0, which mta-admin stores as NULL) means no quota.

ALTER TABLE users ADD COLUMN used_bytes INTEGER NOT NULL DEFAULT 0;
UPDATE users SET used_bytes = used_mb * 1048576;

-- The running directory keeps every user's quota in its snapshot (the RCPT check
-- reads it there), so a quota change reloads the snapshot like the other changes.
CREATE TRIGGER users_quota_update AFTER UPDATE OF quota_mb ON users
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
