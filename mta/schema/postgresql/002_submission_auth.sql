-- As mta/schema/002_submission_auth.sql: service accounts that may use any MAIL FROM
-- address, and an index so expired AUTH failure records are purged without a scan.

ALTER TABLE users ADD COLUMN send_as_any BOOLEAN NOT NULL DEFAULT FALSE;

CREATE INDEX auth_failures_by_first_failure ON auth_failures (first_failure);
