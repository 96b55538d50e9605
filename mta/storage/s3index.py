"""The S3 store's per-recipient index: rows of the SQL store's ``messages`` table.

Why that table and not one of its own: a row there already is what the index needs
(user, folder, tag for `has_delivered`, size, Date, From, Subject, headers) and
its search index beside it is what ``mta-admin search`` reads, so S3 mail is
searchable by the same query, and mail stays readable when a mailbox moves between
the ``sql`` and ``s3`` backends.  Migration ``005_message_objects.sql`` adds
``object_key``: for an S3 row, ``body`` holds only the recipient's own lines (its
Return-Path and Delivered-To, sealed when encryption is on) and the object holds
the rest, once for every recipient.

The table is wherever `mta.db` keeps its tables (`mta.db.location`): the SQLite
file ``<datadir>/mta.db`` (the row's words in ``indexed``, which the FTS5 index
``messages_fts`` reads through its triggers), or, with ``[database]
dsn``, PostgreSQL (the row's ``search_vector``), which every node of a cluster
shares: any node lists, reads, searches and deletes what another delivered, and
`find` (``has_delivered``) sees every node's rows.  The connection is the SQL
store's (`mta.db.database.DatabaseHandle`, opened on first use; SQLite: WAL,
``synchronous=FULL``); on both engines a batch's COMMIT is its durability point.

Deleting the last row of an object deletes the object first (`delete`,
`delete_user`).  On PostgreSQL that runs in one transaction holding the rows of
the objects concerned (``FOR UPDATE``), so two nodes deleting the two last rows
of one object at once never both leave it behind; SQLite has one node, whose store
serialises its deletions, and its write lock is never held across an S3 request.

Every method blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import attrs

from mta.db.database import DatabaseHandle
from mta.storage.items import StoredMessage
from mta.storage.messagedb import INDEX_ROW, MessageDB
from mta.storage.sqlparse import index_words, search_fields
from mta.storage.sqlsearch import search_sql, tsvector_text

__all__ = ["IndexRow", "ObjectIndex", "StoredRow"]


@attrs.frozen
class IndexRow:
    """One recipient's copy of a message, as the index keeps it."""

    user: str
    tag: str
    object_key: str
    own: bytes  # the recipient's own lines (or their sealed blob)
    size: int  # bytes read_message gives back (own lines + object, in clear)
    received: float
    date: float
    message_id: str | None = None
    from_addr: str = ""
    to_addrs: tuple = ()
    to_text: str = ""
    subject: str = ""
    headers: tuple = ()
    text: str = ""


@attrs.frozen
class StoredRow:
    """What reading a message needs from its row."""

    tag: str
    own: bytes
    object_key: str | None  # None: a row of the SQL store (``own`` is the whole message)


def _text(value: str | None) -> str | None:
    """A header value PostgreSQL's text type takes (it refuses NUL characters)."""
    return value if value is None or "\x00" not in value else value.replace("\x00", "\ufffd")


class ObjectIndex:
    """The rows of the database at `location` (an SQLite file or a `postgresql://`
    dsn), created and migrated on first use unless `migrate` is False."""

    def __init__(
        self, location: str, *, clock: Callable[[], float] = time.time, migrate: bool = True
    ):
        self.location = location
        self._clock = clock
        self._conn = DatabaseHandle(
            location,
            migrate=migrate,
            opener=lambda p, migrate: MessageDB(p, clock=clock, migrate=migrate),
        )

    def close(self) -> None:
        self._conn.close()

    def find(self, user: str, tag: str) -> int | None:
        with self._conn().read() as conn:
            row = conn.execute(
                'SELECT id FROM messages WHERE "user" = ? AND tag = ? LIMIT 1', (user, tag)
            ).fetchone()
        return None if row is None else row[0]

    def insert(self, rows: Sequence[IndexRow]) -> list[int]:
        """Insert every row in one transaction; their ids, in order."""
        db = self._conn()
        columns = 'message_id, "user", tag, from_addr, to_addrs, subject, date, received,'
        columns += " size, headers, body, object_key"
        values = "?,?,?,?,?,?,?,?,?,?,?,?"
        if db.dialect == "postgresql":  # the search words go into the row itself
            columns += ", search_vector"
            values += ", to_tsvector('simple', ?)"
        else:  # the words the view gives SQLite's search index (the body is in S3)
            columns += ", indexed"
            values += ", ?"
        insert = f"INSERT INTO messages ({columns}) VALUES ({values}) RETURNING id"
        ids = []
        with db.transaction(exclusive=False) as conn:
            for r in rows:
                params = [
                    _text(r.message_id),
                    r.user,
                    r.tag,
                    _text(r.from_addr),
                    json.dumps(list(r.to_addrs), ensure_ascii=False),
                    _text(r.subject),
                    r.date,
                    r.received,
                    r.size,
                    json.dumps([list(h) for h in r.headers], ensure_ascii=False),
                    r.own,
                    r.object_key,
                ]
                if db.dialect == "postgresql":
                    params.append(tsvector_text(r.subject, r.from_addr, r.to_text, r.text))
                else:
                    words = index_words(r.subject, r.from_addr, r.to_text, r.text)
                    params.append(search_fields(words))
                row_id = conn.execute(insert, params).fetchone()[0]
                if db.dialect == "sqlite":
                    conn.execute(INDEX_ROW, (row_id, *words))
                ids.append(row_id)
        return ids

    def list(self, user: str) -> list[StoredMessage]:
        with self._conn().read() as conn:
            rows = conn.execute(
                'SELECT id, size, received, folder FROM messages WHERE "user" = ?'
                " ORDER BY received, id",
                (user,),
            ).fetchall()
        return [StoredMessage(str(i), size, received, folder) for i, size, received, folder in rows]

    def get(self, user: str, row_id: int) -> StoredRow | None:
        with self._conn().read() as conn:
            row = conn.execute(
                'SELECT tag, body, object_key FROM messages WHERE id = ? AND "user" = ?',
                (row_id, user),
            ).fetchone()
        return None if row is None else StoredRow(row[0], bytes(row[1]), row[2])

    def delete(self, user: str, row_id: int, delete_object: Callable[[str], object]) -> bool:
        """Delete one row (False when it does not exist); first, its object through
        `delete_object(key)` when no other row needs it (a failure there raises and
        leaves the row)."""
        db = self._conn()
        if db.dialect == "sqlite":  # no write lock held across the S3 request
            with db.read() as conn:
                exists, sole = _sole_object(conn, user, row_id, lock="")
            if not exists:
                return False
            if sole is not None:
                delete_object(sole)
            with db.transaction(exclusive=False) as conn:
                conn.execute('DELETE FROM messages WHERE id = ? AND "user" = ?', (row_id, user))
            return True
        with db.transaction(exclusive=False) as conn:
            exists, sole = _sole_object(conn, user, row_id, lock=" FOR UPDATE")
            if not exists:
                return False
            if sole is not None:
                delete_object(sole)
            conn.execute('DELETE FROM messages WHERE id = ? AND "user" = ?', (row_id, user))
        return True

    def delete_user(self, user: str, delete_object: Callable[[str], object]) -> bool:
        """Delete every row of `user` (False when there was none); first, through
        `delete_object(key)`, the objects no row of another user needs."""
        db = self._conn()
        if db.dialect == "sqlite":  # as in `delete`
            with db.read() as conn:
                keys = _objects_only_of(conn, user)
            for key in keys:
                delete_object(key)
            with db.transaction(exclusive=False) as conn:
                return _delete_rows_of(conn, user)
        with db.transaction(exclusive=False) as conn:
            conn.execute(
                "SELECT id FROM messages WHERE object_key IN (SELECT object_key FROM messages"
                ' WHERE "user" = ? AND object_key IS NOT NULL) ORDER BY id FOR UPDATE',
                (user,),
            ).fetchall()
            for key in _objects_only_of(conn, user):
                delete_object(key)
            return _delete_rows_of(conn, user)

    def sealed_rows(self) -> list[tuple[int, bytes]]:
        """(id, own lines) of every S3 row: what `mta-admin key retire` re-wraps."""
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT id, body FROM messages WHERE object_key IS NOT NULL"
            ).fetchall()
        return [(i, bytes(own)) for i, own in rows]

    def replace_own(self, row_id: int, own: bytes) -> None:
        with self._conn().transaction(exclusive=False) as conn:
            conn.execute("UPDATE messages SET body = ? WHERE id = ?", (own, row_id))

    def object_keys(self) -> list[str]:
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT DISTINCT object_key FROM messages WHERE object_key IS NOT NULL"
            ).fetchall()
        return [r[0] for r in rows]

    def search(
        self, query: str, *, user: str | None, since: float | None, limit: int
    ) -> list[tuple]:
        """(id, user, folder, date, from, subject) of the rows matching `query`
        (`mta.storage.sqlsearch.search_sql`: every word), newest first."""
        db = self._conn()
        found = search_sql(db.dialect, query, user=user, since=since, limit=limit)
        if found is None:
            return []
        sql, params = found
        with db.read() as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    def probe(self) -> None:
        """A write transaction (a row inserted, then rolled back); raises the
        driver's error saying why the index cannot take a row now."""

        class _Rollback(Exception):
            pass

        try:
            with self._conn().transaction(exclusive=False) as conn:
                conn.execute(
                    'INSERT INTO messages ("user", tag, date, received, size, body, object_key)'
                    " VALUES ('', 'probe', 0, 0, 0, ?, 'probe')",
                    (b"",),
                )
                raise _Rollback
        except _Rollback:
            pass


def _sole_object(conn, user: str, row_id: int, *, lock: str) -> tuple[bool, str | None]:
    """(whether the row exists, the key of its object when no other row uses it).

    `lock` " FOR UPDATE" (PostgreSQL) holds every row of the object, in id order
    (so two deleters never wait on each other), until the end of the transaction."""
    row = conn.execute(
        'SELECT object_key FROM messages WHERE id = ? AND "user" = ?', (row_id, user)
    ).fetchone()
    if row is None:
        return False, None
    if row[0] is None:
        return True, None
    ids = [
        i
        for (i,) in conn.execute(
            f"SELECT id FROM messages WHERE object_key = ? ORDER BY id{lock}", (row[0],)
        ).fetchall()
    ]
    if row_id not in ids:  # deleted by another node meanwhile
        return False, None
    return True, row[0] if ids == [row_id] else None


def _objects_only_of(conn, user: str) -> list[str]:
    """Keys of the objects of `user`'s rows that no row of another user needs."""
    rows = conn.execute(
        'SELECT DISTINCT object_key FROM messages AS m WHERE "user" = ?'
        " AND object_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM messages"
        ' WHERE object_key = m.object_key AND "user" != ?)',
        (user, user),
    ).fetchall()
    return [r[0] for r in rows]


def _delete_rows_of(conn, user: str) -> bool:
    cursor = conn.execute('DELETE FROM messages WHERE "user" = ?', (user,))
    return cursor.rowcount > 0
