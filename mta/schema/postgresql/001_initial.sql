-- Users, aliases and the audit log on PostgreSQL: the same tables as
-- mta/schema/001_initial.sql for SQLite, so one set of queries (mta.db) serves both.
-- Timestamps are Unix seconds (DOUBLE PRECISION); flags are BOOLEAN (SQLite keeps
-- them as 0/1).  Text keys sort by code point (COLLATE "C"), as SQLite's BINARY does,
-- whatever the database's locale.

CREATE TABLE users (
    username      TEXT COLLATE "C" PRIMARY KEY,     -- the folded email address
    email         TEXT COLLATE "C" UNIQUE NOT NULL,
    password_hash TEXT,                             -- Argon2id; NULL = login disabled
    created_at    DOUBLE PRECISION NOT NULL,
    last_login    DOUBLE PRECISION,
    quota_mb      INTEGER,                          -- NULL = no quota
    used_mb       INTEGER NOT NULL DEFAULT 0,
    enabled       BOOLEAN NOT NULL DEFAULT TRUE
);

-- rowid: the order targets were added in (SQLite's implicit rowid, which the
-- queries name).
CREATE TABLE aliases (
    source     TEXT COLLATE "C" NOT NULL,           -- folded local address
    target     TEXT COLLATE "C" NOT NULL,           -- any mailbox, local or remote
    created_at DOUBLE PRECISION NOT NULL,
    rowid      BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    PRIMARY KEY (source, target)
);

CREATE TABLE audit_log (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    timestamp  DOUBLE PRECISION NOT NULL,
    username   TEXT COLLATE "C",
    action     TEXT NOT NULL,                       -- e.g. user.add, alias.del, auth.login
    ip_address TEXT,
    user_agent TEXT,
    success    BOOLEAN NOT NULL,
    details    TEXT                                 -- JSON object
);
CREATE INDEX audit_log_by_time ON audit_log (timestamp);
CREATE INDEX audit_log_by_user ON audit_log (username, timestamp);

-- AUTH lockouts (mta.db.lockouts): shared by every node, so a password spray spread
-- over several nodes locks out as it would on one.
CREATE TABLE auth_failures (
    key           TEXT COLLATE "C" PRIMARY KEY,
    failures      INTEGER NOT NULL,
    first_failure DOUBLE PRECISION NOT NULL,
    locked_until  DOUBLE PRECISION
);

-- Bumped by every change that can alter recipient resolution; the running directory
-- polls it to know when to reload its snapshot (mta.db.directory).
CREATE TABLE directory_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation BIGINT NOT NULL
);
INSERT INTO directory_generation (id, generation) VALUES (1, 0);

CREATE FUNCTION mta_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE directory_generation SET generation = generation + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER users_insert_delete AFTER INSERT OR DELETE ON users
FOR EACH ROW EXECUTE FUNCTION mta_directory_changed();
CREATE TRIGGER users_update AFTER UPDATE OF username, email, enabled ON users
FOR EACH ROW EXECUTE FUNCTION mta_directory_changed();
CREATE TRIGGER aliases_change AFTER INSERT OR UPDATE OR DELETE ON aliases
FOR EACH ROW EXECUTE FUNCTION mta_directory_changed();
