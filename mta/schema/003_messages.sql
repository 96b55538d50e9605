-- The SQL mail store (issue 13, `[storage] backend = "sql"`, mta.storage.sql): one row
-- per delivered message, byte-exact, and an FTS5 index for `mta-admin search`.
-- Times are Unix seconds (REAL), like the other tables: `date` is the message's Date:
-- header (the delivery time when it is missing or unreadable), `received` is when
-- this store took the message.

CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,          -- the store's id (read_message, delete)
    message_id TEXT,                         -- the Message-ID: header, as written
    user       TEXT NOT NULL,                -- mta.db.address_key of the mailbox
    folder     TEXT NOT NULL DEFAULT 'INBOX',
    tag        TEXT NOT NULL,                -- the delivery's message_tag (has_delivered)
    from_addr  TEXT,                         -- From:, RFC 2047 decoded
    to_addrs   TEXT,                         -- JSON array of To: and Cc: addresses
    subject    TEXT,                         -- RFC 2047 decoded
    date       REAL NOT NULL,
    received   REAL NOT NULL,
    size       INTEGER NOT NULL,             -- length(body)
    flags      TEXT NOT NULL DEFAULT '',     -- Maildir-style letters, e.g. 'RS'
    headers    TEXT,                         -- JSON array of [name, value]
    body       BLOB NOT NULL                 -- the whole message, exactly as delivered
);
CREATE INDEX messages_by_folder_date ON messages (user, folder, date);
CREATE INDEX messages_by_tag ON messages (user, tag);
-- What search sorts and filters the FTS matches by, without reading the rows (whose
-- bodies make them long): the store names it with INDEXED BY.
CREATE INDEX messages_for_search ON messages (id, user, date);

-- The search index; rowid = messages.id.  Rows are inserted by the store in the
-- delivery's transaction (the body text is extracted in Python); deleting a message
-- deletes its row here through the trigger, whoever deletes it.
CREATE VIRTUAL TABLE messages_fts USING fts5 (
    subject, from_addr, to_addrs, body,
    tokenize = 'unicode61 remove_diacritics 2'
);

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
BEGIN DELETE FROM messages_fts WHERE rowid = old.id; END;
