"""SQLite's search index keeps tokens, not text (``007_search_index.sql``): rows are
indexed and un-indexed through the view ``messages_search`` by triggers, so FTS5's
own integrity check against the content must pass after any mix of deliveries,
updates and deletes, from the SQL store and the S3 index alike, and after an
upgrade from a database whose index held a copy of the text."""

from __future__ import annotations

import json
import sqlite3

import attrs
import pytest

from mta.db.schema import load_migrations
from mta.db.sqlite import SQLiteEngine
from mta.envelope import Address
from mta.storage import StoreItem
from mta.storage.messagedb import MessageDB, check_search_index, install, reindex
from mta.storage.s3index import IndexRow, ObjectIndex
from mta.storage.sql import SQLStore
from mta.storage.sqlparse import parse_message
from mta.testing import MemoryBody
from tests.storage.test_sql import _single_and_multipart_messages, message

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")

ODD_MESSAGES = [
    b"Subject: nul\x00inside words\r\nFrom: x@y\r\n\r\ntext\x00after nul\r\n",
    b"Subject: caf\xc3\xa9 eight bit \xff\r\nFrom: J\xc3\xb6rg <j@x.test>\r\n\r\n\xfe\xff\r\n",
    b"",
    b"\r\n\r\n",
    b"Subject: =?utf-8?q?caf=C3=A9?= =?bogus?x?y?=\r\n\r\nhello\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n",
]


def check(path: str) -> bool:
    db = MessageDB(path, clock=lambda: 0.0)
    try:
        return check_search_index(db) is None
    finally:
        db.close()


def deliver(store, box, data, tag):
    [outcome] = store.deliver_batch([StoreItem(box, tag, b"", MemoryBody(data))])
    assert isinstance(outcome, str), outcome
    return outcome


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "mta.db")


def test_the_index_keeps_no_copy_of_the_text(path):
    store = SQLStore(path)
    deliver(store, BOB, message(subject="quarterly", body="figures " * 1000), "a")
    with sqlite3.connect(path) as conn:
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "messages_fts" in names and "messages_fts_content" not in names
    assert [h.subject for h in store.search("figures")] == ["quarterly"]
    store.close()


def test_the_index_stays_in_step_through_every_kind_of_change(path):
    store = SQLStore(path)
    corpus = _single_and_multipart_messages() + ODD_MESSAGES
    ids = [deliver(store, BOB, data, f"t{i}") for i, data in enumerate(corpus)]
    ids += [deliver(store, CAROL, message(subject="lunch"), "c1")]
    index = ObjectIndex(path)
    [s3_row] = index.insert(
        [
            IndexRow(
                "bob@example.test",
                "s3-0",
                "2024/01/01/x.eml",
                b"Delivered-To: bob\r\n",
                100,
                1.0,
                1.0,
                subject="kept in s3",
                from_addr="Alice <alice@example.org>",
                to_text="bob@example.test",
                text="the body lives in a bucket",
            )
        ]
    )
    assert check(path)
    assert [h.message_id for h in store.search("bucket")] == [str(s3_row)]
    assert {h.message_id for h in store.search("ünïcode")} == {
        ids[1].removeprefix("sql:"),
        ids[2].removeprefix("sql:"),
    }

    store.delete_message(BOB, ids[0])
    index.replace_own(s3_row, b"Delivered-To: bob\r\nX-Rewrapped: yes\r\n")
    with sqlite3.connect(path) as conn:  # now indexed by its body: the update triggers
        install(conn)
        conn.execute("UPDATE messages SET indexed = NULL WHERE id = ?", (s3_row,))
    assert check(path)
    assert store.search("bucket") == []
    store.delete_message(BOB, ids[3])
    assert check(path)
    assert store.remove_mailbox(BOB) is True
    assert check(path)
    assert [h.user for h in store.search("lunch")] == ["carol@example.test"]
    index.close()
    store.close()


def test_a_connection_without_the_function_cannot_delete(path):
    store = SQLStore(path)
    deliver(store, BOB, message(subject="keep me"), "a")
    with sqlite3.connect(path) as conn, pytest.raises(sqlite3.OperationalError) as e:
        conn.execute("DELETE FROM messages")
    assert "no such function: mta_" in str(e.value)
    assert [h.subject for h in store.search("keep")] == ["keep me"]
    assert check(path)
    store.close()


def test_an_index_out_of_step_is_found_and_rebuilt(path):
    store = SQLStore(path)
    first = deliver(store, BOB, message(subject="hello one"), "a")
    deliver(store, BOB, message(subject="hello two"), "b")
    with sqlite3.connect(path) as conn:  # words the row was not indexed under
        conn.execute(
            "INSERT INTO messages_fts (messages_fts, rowid, subject, from_addr, to_addrs, body)"
            " VALUES ('delete', ?, 'hello one', '', '', 'other words')",
            (int(first.removeprefix("sql:")),),
        )
    assert [h.subject for h in store.search("hello")] == ["hello two"]
    assert not check(path)
    db = MessageDB(path, clock=lambda: 0.0)
    assert check_search_index(db) == "the index does not hold the words of the messages"
    assert reindex(db) == 2
    db.close()
    assert check(path)
    assert sorted(h.subject for h in store.search("hello")) == ["hello one", "hello two"]
    store.close()


def _old_database(path: str) -> tuple[int, int]:
    """A database at schema 6, whose index held its own copy of the words: one row
    of the SQL store and one of the S3 index, indexed as those versions did."""
    engine = SQLiteEngine(path)
    engine.migrate(load_migrations()[:6])
    data = message(subject="from before", body="an old message")
    f = parse_message(data, 0.0)
    ids = []
    with engine.transaction() as conn:
        for body, key, words in (
            (data, None, (f.subject, f.from_addr, f.to_text, f.text)),
            (b"Delivered-To: bob\r\n", "k/1.eml", ("old s3", "a@b", "bob", "an old object")),
        ):
            row = conn.execute(
                'INSERT INTO messages ("user", tag, date, received, size, body, object_key)'
                " VALUES ('bob@example.test', ?, 0, 0, ?, ?, ?) RETURNING id",
                (f"old{len(ids)}", len(body), body, key),
            ).fetchone()[0]
            conn.execute(
                "INSERT INTO messages_fts (rowid, subject, from_addr, to_addrs, body)"
                " VALUES (?,?,?,?,?)",
                (row, *words),
            )
            ids.append(row)
    engine.close()
    return ids[0], ids[1]


def test_upgrade_moves_the_words_and_drops_the_copy(path):
    sql_row, s3_row = _old_database(path)
    store = SQLStore(path)
    assert [h.message_id for h in store.search("old")] == [str(s3_row), str(sql_row)]
    assert check(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 7
        indexed = dict(conn.execute("SELECT id, indexed FROM messages").fetchall())
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert indexed[s3_row] == '["old s3","a@b","bob","an old object"]'
    assert json.loads(indexed[sql_row])[0] == "from before"
    assert not {"messages_fts_copy", "messages_fts_content"} & names
    store.delete_message(BOB, f"sql:{sql_row}")
    assert [h.message_id for h in store.search("old")] == [str(s3_row)]
    assert check(path)
    store.close()


def test_a_parser_that_changed_refuses_the_delete_until_reindexed(path, monkeypatch):
    """Another Python may parse a stored message into other words: deleting it then
    fails, naming the command, and the index keeps every other message."""
    store = SQLStore(path)
    first = deliver(store, BOB, message(subject="hello one", body="alpha"), "a")
    deliver(store, BOB, message(subject="hello two", body="beta"), "b")
    store.close()

    real = parse_message

    def changed(data, now):
        f = real(data, now)
        return attrs.evolve(f, text=f.text + " gamma") if b"alpha" in data else f

    monkeypatch.setattr("mta.storage.messagedb.parse_message", changed)
    store = SQLStore(path)
    with pytest.raises(OSError) as e:
        store.delete_message(BOB, first)
    assert "mta-admin db reindex" in str(e.value)
    assert sorted(h.subject for h in store.search("hello")) == ["hello one", "hello two"]
    db = MessageDB(path, clock=lambda: 0.0)
    assert (
        check_search_index(db) == "1 message(s) now give other words than they were indexed under"
    )
    assert reindex(db) == 2
    assert check_search_index(db) is None
    db.close()
    assert [h.subject for h in store.search("gamma")] == ["hello one"]
    store.delete_message(BOB, first)
    assert [h.subject for h in store.search("hello")] == ["hello two"]
    assert check(path)
    store.close()


def test_a_row_inserted_by_hand_is_deleted_once_indexed(path):
    store = SQLStore(path)
    deliver(store, BOB, message(subject="indexed"), "a")
    with sqlite3.connect(path) as conn:
        install(conn)
        conn.execute(
            'INSERT INTO messages ("user", tag, date, received, size, body)'
            " VALUES ('bob@example.test', 'hand', 0, 0, 3, x'414243')"
        )
        with pytest.raises(sqlite3.IntegrityError, match="mta-admin db reindex"):
            conn.execute("DELETE FROM messages WHERE tag = 'hand'")
    assert not check(path)
    db = MessageDB(path, clock=lambda: 0.0)
    assert reindex(db) == 2
    db.close()
    with sqlite3.connect(path) as conn:
        install(conn)
        conn.execute("DELETE FROM messages WHERE tag = 'hand'")
    assert check(path)
    store.close()


def test_deliveries_and_deletes_from_two_threads_keep_the_index_in_step(path):
    """The functions' memory is shared by every thread of the store's connection."""
    import threading

    store = SQLStore(path)
    errors = []
    ids = [
        deliver(store, BOB, message(subject=f"old {n}", body=f"text {n} " * 200), f"o{n}")
        for n in range(40)
    ]

    def delivering():
        try:
            for n in range(40):
                deliver(store, CAROL, message(subject=f"new {n}", body=f"word{n} " * 300), f"n{n}")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    def deleting():
        try:
            for stored in ids:
                store.delete_message(BOB, stored)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=delivering), threading.Thread(target=deleting)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert check(path)
    assert store.search("old") == [] and len(store.search("new", limit=100)) == 40
    store.close()
