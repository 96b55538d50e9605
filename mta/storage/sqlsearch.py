"""Full-text search of the SQL mail store, in both dialects.

SQLite searches its FTS5 table ``messages_fts`` (tokenizer ``unicode61
remove_diacritics 2``); PostgreSQL a ``tsvector`` column with a GIN index.  So that
one query finds the same messages on both, PostgreSQL never tokenizes mail itself
(its parser keeps ``alice@example.org`` or ``foo.bar`` as one token, where FTS5
sees two words): `search_words` splits text the way unicode61 does (runs of
letters and digits, diacritics removed, lower case), and the 'simple'
configuration only stores those words.

A query is every word of the user's text (white space separated), each a phrase
of its tokens: ``foo.bar`` finds "foo" followed by "bar"; nothing typed is ever
query syntax (`fts_query`, `tsquery_phrases`).
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["fts_query", "search_sql", "search_words", "tsvector_text"]

_TOKEN_RE = re.compile(r"[^\s\x00-\x1f\x7f]+")  # FTS5 stops reading at a NUL
_WORD_RE = re.compile(r"[^\W_]+")  # letters and digits of any script
# tsvector's limits: 1 MB in all, 2 KB per word.  Words after the first
# _MAX_TSVECTOR_TEXT bytes of a message are not indexed on PostgreSQL.
_MAX_TSVECTOR_TEXT = 192 * 1024
_MAX_WORD_BYTES = 2000


def fts_query(text: str) -> str:
    """An FTS5 query matching messages that contain every word of `text`.

    Each word (separated by white space or control characters) becomes a quoted
    phrase, quotes doubled, so no input is FTS5 syntax: ``AND``, ``*``, ``:``,
    ``(`` and unbalanced quotes are searched for as text, never parsed.  Punctuation
    inside a word splits it into a phrase (``foo.bar`` finds "foo" followed by "bar").
    """
    return " ".join('"' + word.replace('"', '""') + '"' for word in _TOKEN_RE.findall(text))


def search_words(text: str) -> list[str]:
    """The words of `text` as FTS5's unicode61 tokenizer (remove_diacritics 2)
    indexes them: letters and digits, marks dropped, lower case."""
    if not text.isascii():
        text = "".join(
            ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)
        )
    return _WORD_RE.findall(text.lower())


def tsvector_text(*fields: str) -> str:
    """The words of `fields`, space separated, for ``to_tsvector('simple', ...)``;
    cut short to stay within tsvector's size limit."""
    out: list[str] = []
    size = 0
    for field in fields:
        for word in search_words(field or ""):
            length = len(word.encode("utf-8")) + 1
            if length > _MAX_WORD_BYTES:
                continue
            size += length
            if size > _MAX_TSVECTOR_TEXT:
                return " ".join(out)
            out.append(word)
    return " ".join(out)


def tsquery_phrases(text: str) -> list[str]:
    """One phrase (its words, space separated) per word of the query `text`, for
    ``phraseto_tsquery('simple', ...)``; a word without letters or digits is left out."""
    phrases = []
    for token in _TOKEN_RE.findall(text):
        words = search_words(token)
        if words:
            phrases.append(" ".join(words))
    return phrases


def search_sql(
    dialect: str, query: str, *, user: str | None, since: float | None, limit: int
) -> tuple[str, list] | None:
    """The SELECT (and its parameters, `?` placeholders) giving id, user, folder,
    date, from_addr, subject of the matches, newest first (by Date:, then the
    latest delivered); None when the query has no word to search for."""
    where = ""
    filters: list = []
    if user is not None:
        where += ' AND m."user" = ?'
        filters.append(user)
    if since is not None:
        where += " AND m.date >= ?"
        filters.append(since)
    if dialect == "postgresql":
        phrases = tsquery_phrases(query)
        if not phrases:
            return None
        match = " && ".join(["phraseto_tsquery('simple', ?)"] * len(phrases))
        sql = (
            'SELECT m.id, m."user", m.folder, m.date, m.from_addr, m.subject FROM messages AS m'
            f" WHERE m.search_vector @@ ({match}){where}"
            " ORDER BY m.date DESC, m.id DESC LIMIT ?"
        )
        return sql, [*phrases, *filters, max(0, limit)]
    match = fts_query(query)
    if not match:
        return None
    # The matches are sorted and cut to `limit` through the small index first; only
    # those rows are then read (FTS5's own rank would score every match).
    sql = (
        'SELECT id, "user", folder, date, from_addr, subject FROM messages WHERE id IN ('
        " SELECT m.id FROM messages_fts"
        " JOIN messages AS m INDEXED BY messages_for_search ON m.id = messages_fts.rowid"
        f" WHERE messages_fts MATCH ?{where} ORDER BY m.date DESC, m.id DESC LIMIT ?"
        ") ORDER BY date DESC, id DESC"
    )
    return sql, [match, *filters, max(0, limit)]
