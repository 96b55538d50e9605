-- The search index keeps tokens, not text (mta.storage.messagedb): `messages_fts`
-- becomes an FTS5 table with external content, the view `messages_search`, instead
-- of holding a second copy of every message's text (a 100 KB message was written
-- three times: its row, the index's copy, the tokens).  The writer of a row indexes
-- it with the words it parsed; deleting or updating a row un-indexes it with the
-- words the view gives: those kept in its new `indexed` column (S3 rows, whose body
-- is in the bucket, and every row indexed before this migration), else
-- mta_search_fields(body), the stored message parsed again by a function each
-- connection that writes `messages` registers.  Words are a JSON array [subject,
-- from, to, body text] (mta.storage.sqlparse.search_fields).

ALTER TABLE messages ADD COLUMN indexed TEXT;      -- the words, when kept in the row
ALTER TABLE messages ADD COLUMN words_crc INTEGER;  -- check value of words parsed again

-- Rows indexed before keep the words they were indexed under (their old copy, now
-- JSON: SQLite's JSON functions end a string at a NUL, which is why the store turns
-- NUL into a space before indexing), so un-indexing them needs no parse at all.
UPDATE messages SET indexed = (
    SELECT json_array(f.subject, f.from_addr, f.to_addrs, f.body)
    FROM messages_fts AS f WHERE f.rowid = messages.id
);

DROP TRIGGER messages_fts_delete;
DROP TABLE messages_fts;  -- its copy of the words is in `indexed` now

CREATE VIEW messages_search (id, subject, from_addr, to_addrs, body) AS
SELECT id,
       json_extract(words, '$[0]'), json_extract(words, '$[1]'),
       json_extract(words, '$[2]'), json_extract(words, '$[3]')
FROM (SELECT id, coalesce(indexed, mta_search_fields(body)) AS words FROM messages);

CREATE VIRTUAL TABLE messages_fts USING fts5 (
    subject, from_addr, to_addrs, body,
    content = 'messages_search', content_rowid = 'id',
    tokenize = 'unicode61 remove_diacritics 2'
);

INSERT INTO messages_fts (rowid, subject, from_addr, to_addrs, body)
SELECT id, json_extract(indexed, '$[0]'), json_extract(indexed, '$[1]'),
       json_extract(indexed, '$[2]'), json_extract(indexed, '$[3]')
FROM messages WHERE indexed IS NOT NULL;

-- Un-indexing a row of the SQL store first checks that its message still gives the
-- words it was indexed under (words_crc, set by the store); if not (the parser
-- changed), the statement fails rather than removing the wrong tokens.
CREATE TRIGGER messages_fts_delete BEFORE DELETE ON messages BEGIN
    SELECT RAISE(ABORT, 'the search index holds other words for this message: run mta-admin db reindex')
    WHERE old.indexed IS NULL AND old.words_crc IS NOT mta_words_crc(old.body);
    INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_addrs, body)
    SELECT 'delete', id, subject, from_addr, to_addrs, body
    FROM messages_search WHERE id = old.id;
END;

CREATE TRIGGER messages_fts_update_before BEFORE UPDATE OF body, indexed ON messages BEGIN
    SELECT RAISE(ABORT, 'the search index holds other words for this message: run mta-admin db reindex')
    WHERE old.indexed IS NULL AND old.words_crc IS NOT mta_words_crc(old.body);
    INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_addrs, body)
    SELECT 'delete', id, subject, from_addr, to_addrs, body
    FROM messages_search WHERE id = old.id;
END;

-- The new words of an updated row, and their check value when they come from the body.
CREATE TRIGGER messages_fts_update_after AFTER UPDATE OF body, indexed ON messages BEGIN
    INSERT INTO messages_fts (rowid, subject, from_addr, to_addrs, body)
    SELECT id, subject, from_addr, to_addrs, body FROM messages_search WHERE id = new.id;
    UPDATE messages SET words_crc = mta_words_crc(new.body)
    WHERE id = new.id AND new.indexed IS NULL AND new.words_crc IS NOT mta_words_crc(new.body);
END;
