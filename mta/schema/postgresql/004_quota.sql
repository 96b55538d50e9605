-- As mta/schema/004_quota.sql: the bytes each mailbox holds (mta.storage.quota), and
-- a quota change reloads the directory's snapshot (which carries every quota).
-- BIGINT: a mailbox may hold more than 2 GiB.

ALTER TABLE users ADD COLUMN used_bytes BIGINT NOT NULL DEFAULT 0;
UPDATE users SET used_bytes = used_mb::BIGINT * 1048576;

CREATE TRIGGER users_quota_update AFTER UPDATE OF quota_mb ON users
FOR EACH ROW EXECUTE FUNCTION mta_directory_changed();
