-- The S3 mail store (issue 13, `[storage] backend = "s3"`, mta.storage.s3store): each
-- message is ONE object in the bucket however many local recipients it has, and each
-- recipient gets a row of `messages` (the index: user, folder, tag, size, dates, From,
-- Subject, and messages_fts for `mta-admin search`, exactly as the SQL store keeps).
-- For such a row `body` holds only what differs per recipient (the Return-Path and
-- Delivered-To lines the message is delivered with) and `object_key` names the object
-- holding the rest; rows of the SQL store keep the whole message in `body` and leave
-- `object_key` NULL.
ALTER TABLE messages ADD COLUMN object_key TEXT;
-- Deleting a message deletes its object when no other row still needs it.
CREATE INDEX messages_by_object ON messages (object_key) WHERE object_key IS NOT NULL;
