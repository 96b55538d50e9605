-- Users, aliases and the audit log (DESIGN.md section 3: mta-admin user/alias).
-- Timestamps are Unix seconds (REAL) so that "since" queries are plain comparisons.

CREATE TABLE users (
    username      TEXT PRIMARY KEY,          -- the lower-cased email address
    email         TEXT UNIQUE NOT NULL,
    password_hash TEXT,                      -- Argon2id; NULL = login disabled
    created_at    REAL NOT NULL,
    last_login    REAL,
    quota_mb      INTEGER,                   -- NULL = no quota
    used_mb       INTEGER NOT NULL DEFAULT 0,
    enabled       INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE aliases (
    source     TEXT NOT NULL,                -- lower-cased local address
    target     TEXT NOT NULL,                -- any mailbox, local or remote
    created_at REAL NOT NULL,
    PRIMARY KEY (source, target)
);

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    timestamp  REAL NOT NULL,
    username   TEXT,
    action     TEXT NOT NULL,                -- e.g. user.add, alias.del, auth.login
    ip_address TEXT,
    user_agent TEXT,
    success    INTEGER NOT NULL,
    details    TEXT                          -- JSON object
);
CREATE INDEX audit_log_by_time ON audit_log (timestamp);
CREATE INDEX audit_log_by_user ON audit_log (username, timestamp);

-- AUTH lockouts.  key is the lower-cased username, optionally followed by "|" and a
-- qualifier (e.g. the client IP); `mta-admin user unlock` clears every key of a user.
CREATE TABLE auth_failures (
    key           TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL,
    first_failure REAL NOT NULL,
    locked_until  REAL
);

-- A counter bumped by every change that can alter recipient resolution, so the
-- running directory reloads its snapshot only for those, not for every audit row or
-- last_login update (PRAGMA data_version changes on any commit).
CREATE TABLE directory_generation (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL
);
INSERT INTO directory_generation (id, generation) VALUES (1, 0);

CREATE TRIGGER users_insert AFTER INSERT ON users
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
CREATE TRIGGER users_delete AFTER DELETE ON users
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
CREATE TRIGGER users_update AFTER UPDATE OF username, email, enabled ON users
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
CREATE TRIGGER aliases_insert AFTER INSERT ON aliases
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
CREATE TRIGGER aliases_delete AFTER DELETE ON aliases
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
CREATE TRIGGER aliases_update AFTER UPDATE ON aliases
BEGIN UPDATE directory_generation SET generation = generation + 1; END;
