"""The SQL mail store (``[storage] backend = "sql"``): messages as rows of `mta.db`.

Each message is one row of ``messages`` in the users' database (``<datadir>/mta.db``,
schema in ``mta/schema/003_messages.sql``; or PostgreSQL with ``[database] dsn``,
``mta/schema/postgresql/003_messages.sql``): the whole message, byte-exact
(the store's prefix, then the queued body read with `IMessageBody.chunks`), with
what the index needs parsed out of it (the stdlib ``email`` parser, tolerant:
RFC 2047 subjects and names decoded, a malformed header never stops a delivery).
``messages_fts`` (FTS5, keeping words only: `mta.storage.messagedb`), or on
PostgreSQL the row's ``search_vector`` (GIN), indexes subject, from, to and the text
of the body (`mta.storage.sqlparse`) for `SQLStore.search`, which ``mta-admin
search`` prints (`mta.storage.sqlsearch`).

A batch is ONE transaction: its COMMIT, with ``PRAGMA synchronous=FULL`` on the
SQLite connection (PostgreSQL: its WAL flush), is the durability point.  One item that fails (its body cannot be read)
is rolled back to its savepoint and reported; the others still commit.  Every method
blocks and may be called from any thread of a pool: the database is opened on first
use (never on the reactor); SQLite's one connection is serialised by a lock (it has
one writer anyway), PostgreSQL gives each thread its own.
"""

from __future__ import annotations

import errno
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence

import attrs
from zope.interface import implementer

from mta.db.addresses import address_key, lookup_key
from mta.db.database import DatabaseHandle
from mta.db.errors import DatabaseUnavailable
from mta.interfaces import IMailStore
from mta.storage.items import StoredMessage, StoreItem, read_whole
from mta.storage.messagedb import INDEX_ROW as _INDEX_ROW
from mta.storage.messagedb import MessageDB
from mta.storage.names import safe_component
from mta.storage.sqlparse import MessageFields, index_words, parse_message, words_crc
from mta.storage.sqlsearch import fts_query, search_sql, tsvector_text

__all__ = ["SQLStore", "SearchHit", "fts_query", "parse_message"]

_PREPARE_BUDGET = 16 << 20  # bytes of a batch's messages read before its transaction
_MESSAGE_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")  # as every file store accepts them


@attrs.frozen
class SearchHit:
    """One message found by `SQLStore.search`."""

    message_id: str  # the store's id (read_message / delete_message)
    user: str
    folder: str
    date: float  # the Date: header, seconds since the epoch
    from_addr: str
    subject: str


@implementer(IMailStore)
class SQLStore:
    """Messages in the database at `path`: an SQLite file, or a `postgresql://`
    dsn (created and migrated on first use, unless `migrate` is False)."""

    name = "sql"

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time, migrate: bool = True):
        self.path = path
        self._clock = clock
        self._migrate = migrate
        self._conn = DatabaseHandle(
            path,
            migrate=migrate,
            opener=lambda p, migrate: MessageDB(p, clock=clock, migrate=migrate),
        )

    def close(self) -> None:
        self._conn.close()

    # -- IMailStore -----------------------------------------------------------------

    def deliver_batch(self, items: Sequence[StoreItem]) -> list:
        """Store every item in one transaction; per item, ``sql:<id>`` (its row) or
        the exception that stopped it.  When the COMMIT fails, every item that was
        to be stored reports that error.

        The messages are read and parsed before the transaction, up to
        `_PREPARE_BUDGET` bytes of them (the rest inside it, one at a time): SQLite
        has one writer, and a batch that parsed while holding it kept the other
        delivery lane waiting through work that needs no database."""
        results: list = [None] * len(items)
        users: list = [None] * len(items)
        prepared: list = [None] * len(items)
        budget = _PREPARE_BUDGET
        for i, item in enumerate(items):
            try:
                users[i] = _user(item.mailbox)
                if not _MESSAGE_TAG_RE.match(item.message_tag):
                    raise ValueError(f"bad message tag {item.message_tag!r}")
                if item.size <= budget:
                    budget -= item.size
                    prepared[i] = _prepare(item, self._clock())
            except Exception as e:
                results[i] = storage_error(e)
        try:
            db = self._conn()
            with db.transaction(exclusive=False) as conn:
                now = db.now
                for i, item in enumerate(items):
                    if results[i] is not None:
                        continue
                    try:
                        results[i] = self._deliver_one(conn, db, item, users[i], prepared[i], now)
                    except Exception as e:
                        results[i] = storage_error(e)
                    prepared[i] = None  # its bytes are in the database: let them go
        except Exception as e:  # open, BEGIN or COMMIT: nothing of the batch is stored
            e = storage_error(e)
            for i, result in enumerate(results):
                if not isinstance(result, Exception):
                    results[i] = e
        return results

    def _deliver_one(self, conn, db, item: StoreItem, user: str, prepared, now):
        if item.check_existing:
            row = conn.execute(
                'SELECT id FROM messages WHERE "user" = ? AND tag = ? LIMIT 1',
                (user, item.message_tag),
            ).fetchone()
            if row is not None:
                return f"sql:{row[0]}"
        data, fields = prepared if prepared is not None else _prepare(item, now)
        row = [
            _text(fields.message_id),
            user,
            item.message_tag,
            _text(fields.from_addr),
            json.dumps(fields.to_addrs, ensure_ascii=False),
            _text(fields.subject),
            fields.date,
            now,
            len(data),
            json.dumps(fields.headers, ensure_ascii=False),
            data,
        ]
        columns = 'message_id, "user", tag, from_addr, to_addrs, subject, date, received, size,'
        columns += " headers, body"
        values = "?,?,?,?,?,?,?,?,?,?,?"
        if db.dialect == "postgresql":  # the search words go into the row itself
            columns += ", search_vector"
            values += ", to_tsvector('simple', ?)"
            row.append(tsvector_text(fields.subject, fields.from_addr, fields.to_text, fields.text))
        else:  # SQLite: the words the view gives back, and their check value
            words = index_words(fields.subject, fields.from_addr, fields.to_text, fields.text)
            columns += ", words_crc"
            values += ", ?"
            row.append(words_crc(words))
        conn.execute("SAVEPOINT item")
        try:
            rowid = conn.execute(
                f"INSERT INTO messages ({columns}) VALUES ({values}) RETURNING id", row
            ).fetchone()[0]
            if db.dialect == "sqlite":
                conn.execute(_INDEX_ROW, (rowid, *words))
        except BaseException:
            conn.execute("ROLLBACK TO item")
            conn.execute("RELEASE item")
            raise
        conn.execute("RELEASE item")
        return f"sql:{rowid}"

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        with self._conn().read() as conn:
            row = conn.execute(
                'SELECT 1 FROM messages WHERE "user" = ? AND tag = ? LIMIT 1',
                (_user(mailbox), message_tag),
            ).fetchone()
        return row is not None

    def create_mailbox(self, mailbox) -> None:
        """Nothing to make: a mailbox is the rows that name it."""
        _user(mailbox)
        return None

    def remove_mailbox(self, mailbox) -> bool:
        """Delete every message of `mailbox` (and its index rows); False when it had
        none.  A database error is an OSError (`storage_error`)."""
        user = _user(mailbox)
        try:
            with self._conn().transaction(exclusive=False) as conn:
                cursor = conn.execute('DELETE FROM messages WHERE "user" = ?', (user,))
                return cursor.rowcount > 0
        except Exception as e:
            raise storage_error(e) from None

    def probe(self) -> str:
        """A write transaction (a row inserted, then rolled back): the file takes
        writes now.  Raises the driver's error saying why not."""

        class _Rollback(Exception):
            pass

        try:
            with self._conn().transaction(exclusive=False) as conn:
                conn.execute(
                    'INSERT INTO messages ("user", tag, date, received, size, body)'
                    " VALUES ('', 'probe', 0, 0, 0, ?)",
                    (b"",),
                )
                raise _Rollback
        except _Rollback:
            pass
        return "writable"

    def list_messages(self, mailbox) -> list[StoredMessage]:
        with self._conn().read() as conn:
            rows = conn.execute(
                'SELECT id, size, received, folder FROM messages WHERE "user" = ?'
                " ORDER BY received, id",
                (_user(mailbox),),
            ).fetchall()
        return [StoredMessage(str(i), size, received, folder) for i, size, received, folder in rows]

    def read_message(self, mailbox, message_id: str) -> bytes:
        with self._conn().read() as conn:
            row = conn.execute(
                'SELECT body FROM messages WHERE id = ? AND "user" = ?',
                (_row_id(message_id), _user(mailbox)),
            ).fetchone()
        if row is None:
            raise KeyError(message_id)
        return bytes(row[0])

    def delete_message(self, mailbox, message_id: str) -> None:
        """Delete one message (and its search index entry: SQLite's trigger, or the
        row's own column).  A database error is an OSError (`storage_error`): the
        trigger refuses a message whose words changed (`mta.storage.messagedb`)."""
        key = (_row_id(message_id), _user(mailbox))
        try:
            with self._conn().transaction(exclusive=False) as conn:
                cursor = conn.execute('DELETE FROM messages WHERE id = ? AND "user" = ?', key)
        except Exception as e:
            raise storage_error(e) from None
        if cursor.rowcount == 0:
            raise KeyError(message_id)

    # -- search ---------------------------------------------------------------------

    def search(
        self,
        query: str,
        *,
        user: str | None = None,
        since: float | None = None,
        limit: int = 50,
    ) -> list[SearchHit]:
        """Messages containing every word of `query` (in subject, from, to or body
        text), newest first (by Date:, then the latest delivered).  `user` is a
        ``local@domain`` (folded here); `since` a Unix time."""
        db = self._conn()
        found = search_sql(
            db.dialect,
            query,
            user=None if user is None else lookup_key(user),
            since=since,
            limit=limit,
        )
        if found is None:
            return []
        sql, params = found
        with db.read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            SearchHit(str(i), u, folder, date, from_addr or "", subject or "")
            for i, u, folder, date, from_addr, subject in rows
        ]


_SQLITE_CORRUPT_VTAB = 267  # FTS5 given words a row was not indexed under

# SQLite's primary result codes -> the errno local delivery turns into a reply.
_ERRNO_OF = {
    3: errno.EACCES,  # SQLITE_PERM
    8: errno.EROFS,  # SQLITE_READONLY
    10: errno.EIO,  # SQLITE_IOERR
    13: errno.ENOSPC,  # SQLITE_FULL
    14: errno.EACCES,  # SQLITE_CANTOPEN
}


def storage_error(error: Exception) -> Exception:
    """A database error as the OSError a mail store reports (a temporary failure:
    the message stays queued); any other exception unchanged.  PostgreSQL out of
    reach is an I/O error; its disk full (SQLSTATE 53100) is ENOSPC."""
    text = str(error)
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        number = _ERRNO_OF.get(code, 0)
        if getattr(error, "sqlite_errorcode", 0) == _SQLITE_CORRUPT_VTAB:
            text, number = f"{text}: the search index (mta-admin db reindex)", errno.EIO
    elif isinstance(error, DatabaseUnavailable):
        number = errno.EIO
    elif _is_psycopg_error(error):
        number = errno.ENOSPC if getattr(error, "sqlstate", None) == "53100" else errno.EIO
    else:
        return error
    found = OSError(number, f"mail database: {text}")
    found.__cause__ = error
    return found


def _is_psycopg_error(error: Exception) -> bool:
    psycopg = sys.modules.get("psycopg")  # loaded only when a dsn names PostgreSQL
    return psycopg is not None and isinstance(error, psycopg.Error)


def _text(value: str | None) -> str | None:
    """A header value PostgreSQL's text type takes (it refuses NUL characters)."""
    return value if value is None or "\x00" not in value else value.replace("\x00", "\ufffd")


def _user(mailbox) -> str:
    """The mailbox's key in the rows.  Names no file-based store could hold are
    refused here too (`UnsafeMailboxName`, permanent), as the `IMailStore` contract
    says, so a mailbox can always move to another backend."""
    safe_component(mailbox.domain, "domain")
    safe_component(mailbox.local, "local part")
    return address_key(mailbox)


def _prepare(item: StoreItem, now: float) -> tuple[bytes, MessageFields]:
    """The whole message (the store's prefix, then the queued body) and its
    indexed fields."""
    data = read_whole(item.body, item.prefix)
    return data, parse_message(data, now)


def _row_id(message_id: str) -> int:
    text = str(message_id).removeprefix("sql:")
    if not text.isascii() or not text.isdigit():
        raise KeyError(message_id)
    return int(text)
