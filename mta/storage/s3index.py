"""The S3 store's per-recipient index: rows of the SQL store's ``messages`` table.

Why that table and not one of its own: a row there already is what the index needs
(user, folder, tag for `has_delivered`, size, Date, From, Subject, headers) and
``messages_fts`` beside it is what ``mta-admin search`` reads, so S3 mail is
searchable by the same query, and mail stays readable when a mailbox moves between
the ``sql`` and ``s3`` backends.  Migration ``005_message_objects.sql`` adds
``object_key``: for an S3 row, ``body`` holds only the recipient's own lines (its
Return-Path and Delivered-To, sealed when encryption is on) and the object holds
the rest, once for every recipient.

Every method blocks; one SQLite connection (``<datadir>/mta.db``), opened on first
use, WAL, ``synchronous=FULL``: a batch's COMMIT is its durability point.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import attrs

from mta.db.connection import Connection
from mta.db.database import DatabaseHandle
from mta.storage.items import StoredMessage

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


class _IndexDB(Connection):
    def __init__(self, path: str, *, clock: Callable[[], float]):
        super().__init__(path, clock=clock)
        with self._read() as conn:
            conn.execute("PRAGMA synchronous=FULL")

    def read(self):
        return self._read()


class ObjectIndex:
    """The rows of `path` (created and migrated on first use)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time):
        self.path = path
        self._clock = clock
        self._conn = DatabaseHandle(path, opener=lambda p, migrate: _IndexDB(p, clock=clock))

    def close(self) -> None:
        self._conn.close()

    def find(self, user: str, tag: str) -> int | None:
        with self._conn().read() as conn:
            row = conn.execute(
                "SELECT id FROM messages WHERE user = ? AND tag = ? LIMIT 1", (user, tag)
            ).fetchone()
        return None if row is None else row[0]

    def insert(self, rows: Sequence[IndexRow]) -> list[int]:
        """Insert every row in one transaction; their ids, in order."""
        ids = []
        with self._conn().transaction() as conn:
            for r in rows:
                cursor = conn.execute(
                    "INSERT INTO messages (message_id, user, tag, from_addr, to_addrs, subject,"
                    " date, received, size, headers, body, object_key)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        r.message_id,
                        r.user,
                        r.tag,
                        r.from_addr,
                        json.dumps(list(r.to_addrs), ensure_ascii=False),
                        r.subject,
                        r.date,
                        r.received,
                        r.size,
                        json.dumps([list(h) for h in r.headers], ensure_ascii=False),
                        r.own,
                        r.object_key,
                    ),
                )
                ids.append(cursor.lastrowid)
                conn.execute(
                    "INSERT INTO messages_fts (rowid, subject, from_addr, to_addrs, body)"
                    " VALUES (?,?,?,?,?)",
                    (cursor.lastrowid, r.subject, r.from_addr, r.to_text, r.text),
                )
        return ids

    def list(self, user: str) -> list[StoredMessage]:
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT id, size, received, folder FROM messages WHERE user = ?"
                " ORDER BY received, id",
                (user,),
            ).fetchall()
        return [StoredMessage(str(i), size, received, folder) for i, size, received, folder in rows]

    def get(self, user: str, row_id: int) -> StoredRow | None:
        with self._conn().read() as conn:
            row = conn.execute(
                "SELECT tag, body, object_key FROM messages WHERE id = ? AND user = ?",
                (row_id, user),
            ).fetchone()
        return None if row is None else StoredRow(row[0], bytes(row[1]), row[2])

    def sole_object(self, user: str, row_id: int) -> tuple[bool, str | None]:
        """(whether the row exists, the key of its object when no other row uses it)."""
        with self._conn().read() as conn:
            row = conn.execute(
                "SELECT object_key FROM messages WHERE id = ? AND user = ?", (row_id, user)
            ).fetchone()
            if row is None:
                return False, None
            if row[0] is None:
                return True, None
            others = conn.execute(
                "SELECT 1 FROM messages WHERE object_key = ? AND id != ? LIMIT 1",
                (row[0], row_id),
            ).fetchone()
        return True, None if others else row[0]

    def delete(self, user: str, row_id: int) -> bool:
        with self._conn().transaction() as conn:
            cursor = conn.execute("DELETE FROM messages WHERE id = ? AND user = ?", (row_id, user))
            return cursor.rowcount > 0

    def objects_only_of(self, user: str) -> list[str]:
        """Keys of the objects that no row of another user needs."""
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT DISTINCT object_key FROM messages AS m WHERE user = ?"
                " AND object_key IS NOT NULL AND NOT EXISTS (SELECT 1 FROM messages"
                " WHERE object_key = m.object_key AND user != ?)",
                (user, user),
            ).fetchall()
        return [r[0] for r in rows]

    def delete_user(self, user: str) -> bool:
        with self._conn().transaction() as conn:
            cursor = conn.execute("DELETE FROM messages WHERE user = ?", (user,))
            return cursor.rowcount > 0

    def sealed_rows(self) -> list[tuple[int, bytes]]:
        """(id, own lines) of every S3 row: what `mta-admin key retire` re-wraps."""
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT id, body FROM messages WHERE object_key IS NOT NULL"
            ).fetchall()
        return [(i, bytes(own)) for i, own in rows]

    def replace_own(self, row_id: int, own: bytes) -> None:
        with self._conn().transaction() as conn:
            conn.execute("UPDATE messages SET body = ? WHERE id = ?", (own, row_id))

    def object_keys(self) -> list[str]:
        with self._conn().read() as conn:
            rows = conn.execute(
                "SELECT DISTINCT object_key FROM messages WHERE object_key IS NOT NULL"
            ).fetchall()
        return [r[0] for r in rows]

    def probe(self) -> None:
        """A write transaction (a row inserted, then rolled back); raises
        sqlite3.Error saying why the index cannot take a row now."""

        class _Rollback(Exception):
            pass

        try:
            with self._conn().transaction() as conn:
                conn.execute(
                    "INSERT INTO messages (user, tag, date, received, size, body, object_key)"
                    " VALUES ('', 'probe', 0, 0, 0, x'', 'probe')"
                )
                raise _Rollback
        except _Rollback:
            pass
