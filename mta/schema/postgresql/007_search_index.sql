-- SQLite's 007 makes its FTS5 index keep words instead of a copy of every message's
-- text (mta.storage.messagedb).  Here each row already carries its words, as a
-- tsvector and nothing more: there is nothing to change, only this to record.
COMMENT ON COLUMN messages.search_vector IS
    'the words of subject, from, to and body text (mta.storage.sqlsearch.tsvector_text)';
