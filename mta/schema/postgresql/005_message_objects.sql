-- As mta/schema/005_message_objects.sql: the S3 mail store's index rows name the
-- object holding the message (NULL for rows of the sql store, which keep the body).
ALTER TABLE messages ADD COLUMN object_key TEXT;
CREATE INDEX messages_by_object ON messages (object_key) WHERE object_key IS NOT NULL;
