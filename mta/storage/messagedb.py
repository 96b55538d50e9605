"""The connection the SQL store and the S3 index keep ``messages`` through, and the
SQL functions SQLite's search index reads a stored message's words by.

Since migration ``007_search_index.sql``, ``messages_fts`` is an FTS5 table with
external content (the view ``messages_search``): it stores tokens, no longer a
second copy of each message's text, which was a third of what a delivery into the
SQL store wrote.  A writer indexes the row it inserts with the words it parsed
(`INDEX_ROW`); the triggers that un-index a row (delete, update of its body) read
the view, which gives the words kept in the row's ``indexed`` column (S3 rows,
whose body is in the bucket, and rows indexed before 007) or, for a row of the SQL
store, ``mta_search_fields(body)``: the stored message parsed again.

Parsing again must give the words the row was indexed under, or FTS5 removes the
wrong tokens and says nothing.  So the store keeps a check value of them
(``words_crc``, `mta.storage.sqlparse.words_crc`) and the triggers compare it with
``mta_words_crc(body)`` first: a parser that changed (another Python) makes the
delete fail, naming ``mta-admin db reindex`` (`reindex`), never damages the index.

Each connection that writes ``messages`` registers the two functions (`MessageDB`
does).  One without them (the ``sqlite3`` shell) cannot delete a message: "no such
function: mta_search_fields", an error, not a damaged index.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from mta.db.connection import Connection
from mta.storage.sqlparse import index_words, parse_message, search_fields, words_crc

__all__ = [
    "INDEX_ROW",
    "BodyWords",
    "MessageDB",
    "check_search_index",
    "install",
    "reindex",
]

# How a writer indexes the row it inserted, with the words it parsed: what the view
# gives back for the row (`index_words` made them survive SQLite's JSON unchanged).
INDEX_ROW = (
    "INSERT INTO messages_fts (rowid, subject, from_addr, to_addrs, body) VALUES (?,?,?,?,?)"
)


class BodyWords:
    """``mta_search_fields`` and ``mta_words_crc`` of a stored message.

    The view asks once per column and the trigger once more for the check value:
    the last message's words are kept with its bytes, so it is parsed once."""

    def __init__(self) -> None:
        # (bytes, their words) in ONE attribute: `forget` may run in another thread
        # (after its transaction, outside the connection's lock), and two attributes
        # could be seen half replaced.
        self._last: tuple[bytes | None, tuple[str, ...]] = (None, ())

    def _of(self, body) -> tuple[str, ...]:
        if isinstance(body, str):  # a TEXT body, written by hand: its bytes
            body = body.encode("utf-8", "surrogateescape")
        elif body is None:
            body = b""
        last = self._last
        if body != last[0]:
            f = parse_message(body, 0.0)
            last = self._last = (body, index_words(f.subject, f.from_addr, f.to_text, f.text))
        return last[1]

    def fields(self, body) -> str:
        return search_fields(self._of(body))

    def crc(self, body) -> int:
        return words_crc(self._of(body))

    def forget(self) -> None:
        """Let the last message go (it may be megabytes)."""
        self._last = (None, ())


def install(conn: sqlite3.Connection) -> BodyWords:
    """Register the functions on `conn`; the returned object is their memory."""
    words = BodyWords()
    conn.create_function("mta_search_fields", 1, words.fields, deterministic=True)
    conn.create_function("mta_words_crc", 1, words.crc, deterministic=True)
    return words


class MessageDB(Connection):
    """A connection that writes ``messages``: migrated on open (or checked, with
    `migrate=False`); on SQLite, fsync on commit and `words`, the registered
    functions (None on PostgreSQL, whose rows carry their own ``search_vector``)."""

    def __init__(self, location: str, *, clock: Callable[[], float], migrate: bool = True):
        super().__init__(location, clock=clock, migrate=migrate)
        self.words: BodyWords | None = None
        if self.dialect == "sqlite":
            with self._read() as conn:
                conn.execute("PRAGMA synchronous=FULL")
                self.words = install(conn)

    @property
    def now(self) -> float:
        return self._clock()

    def read(self):
        return self._read()

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Any]:
        """As `Connection.transaction`; the functions' last message is let go at
        the end."""
        try:
            with super().transaction(exclusive=exclusive) as conn:
                yield conn
        finally:
            if self.words is not None:
                self.words.forget()


_CHANGED = (
    "SELECT count(*) FROM messages WHERE indexed IS NULL AND words_crc IS NOT mta_words_crc(body)"
)


def check_search_index(db: MessageDB) -> str | None:
    """None when SQLite's search index holds exactly the words of every row (FTS5's
    'integrity-check' against the view, and every check value still true), else
    what is wrong.  PostgreSQL: None (each row carries its own ``search_vector``)."""
    if db.dialect != "sqlite":
        return None
    with db.transaction() as conn:
        changed = conn.execute(_CHANGED).fetchone()[0]
        try:
            conn.execute(
                "INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)"
            )
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_CORRUPT:
                raise
            if not changed:  # (a message whose words changed fails this check too)
                return "the index does not hold the words of the messages"
    if changed:
        return f"{changed} message(s) now give other words than they were indexed under"
    return None


def reindex(db: MessageDB) -> int:
    """Index every row again from the view (FTS5's 'rebuild') with new check values,
    in one transaction; returns how many rows there are.  (Setting ``words_crc``
    fires no trigger: they watch ``body`` and ``indexed``.)  PostgreSQL: 0, nothing
    to rebuild."""
    if db.dialect != "sqlite":
        return 0
    with db.transaction() as conn:
        conn.execute(
            "UPDATE messages SET words_crc = mta_words_crc(body)"
            " WHERE indexed IS NULL AND words_crc IS NOT mta_words_crc(body)"
        )
        conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
        return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
