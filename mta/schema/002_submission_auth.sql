-- Submission (issue 3): service accounts that may use any MAIL FROM address, and an
-- index so expired AUTH failure records are purged without a table scan.

ALTER TABLE users ADD COLUMN send_as_any INTEGER NOT NULL DEFAULT 0;

CREATE INDEX auth_failures_by_first_failure ON auth_failures (first_failure);
