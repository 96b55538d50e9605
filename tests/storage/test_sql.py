"""The SQL mail store: byte-exact delivery into mta.db, duplicates by tag, and the
full-text index behind `mta-admin search`.  Tests taking `store` run on SQLite
(FTS5) and on a fresh PostgreSQL database (tsvector), `db_location` in
tests/conftest.py; `sqlite_store` tests are SQLite's own (locking, error codes)."""

from __future__ import annotations

import errno
import sqlite3
import threading

import pytest
from zope.interface.verify import verifyObject

from mta.config import build_config
from mta.db import Database
from mta.envelope import Address
from mta.interfaces import IMailStore
from mta.storage import StoredMessage, StoreItem, open_store
from mta.storage.sql import SQLStore, fts_query, parse_message, storage_error
from mta.testing import MemoryBody

BOB = Address("Bob", "Example.Test")
CAROL = Address("carol", "example.test")
JAN_2024 = 1704103200.0  # Mon, 1 Jan 2024 10:00:00 +0000


def message(subject="Hello", body="Just a note.", date="Mon, 1 Jan 2024 10:00:00 +0000", **more):
    headers = {"From": "Alice <alice@example.org>", "To": "Bob <bob@example.test>"}
    headers.update({k.replace("_", "-"): v for k, v in more.items()})
    lines = [f"{k}: {v}" for k, v in headers.items()] + [f"Subject: {subject}", f"Date: {date}"]
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode("utf-8")


class Clock:
    def __init__(self, now=2_000_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(db_location, clock):
    store = SQLStore(db_location, clock=clock)
    yield store
    store.close()


@pytest.fixture
def sqlite_store(tmp_path, clock):
    store = SQLStore(str(tmp_path / "mta.db"), clock=clock)
    yield store
    store.close()


def query(store, sql, params=()):
    """Rows of `sql` (with `?` placeholders), read through a second connection."""
    with Database(store.path) as db, db._read() as conn:
        return conn.execute(sql, params).fetchall()


def deliver(store, box, data, tag="q1-0", prefix=b"Delivered-To: bob@example.test\r\n", **kw):
    [outcome] = store.deliver_batch([StoreItem(box, tag, prefix, MemoryBody(data), **kw)])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


class BrokenBody(MemoryBody):
    def chunks(self, chunk_size=262144):
        yield self.data[:5]
        raise OSError("queue file vanished")


def test_interface(store):
    assert verifyObject(IMailStore, store)
    assert store.name == "sql"


def test_open_store_selects_sql(tmp_path):
    for backend in ("sql", "sqlite"):
        config = build_config({"datadir": str(tmp_path), "storage": {"backend": backend}})
        store = open_store(config)
        assert isinstance(store, SQLStore)
        assert store.path == str(tmp_path / "mta.db")


def test_nothing_is_opened_until_used(tmp_path):
    SQLStore(str(tmp_path / "mta.db"))
    assert not (tmp_path / "mta.db").exists()


def test_deliver_list_read_byte_exact(store, clock):
    data = (
        message(body="8-bit: caf\u00e9 \u2603\r\nline two\nbare LF kept\r\n.\r\n") + b"\xff\xfe\r\n"
    )
    prefix = b"Return-Path: <alice@example.org>\r\nDelivered-To: bob@example.test\r\n"
    where = deliver(store, BOB, data, prefix=prefix)
    [listed] = store.list_messages(Address("BOB", "example.test"))
    assert where == f"sql:{listed.message_id}"
    assert listed == StoredMessage(listed.message_id, len(prefix) + len(data), clock.now, "INBOX")
    assert store.read_message(BOB, listed.message_id) == prefix + data
    assert store.read_message(BOB, where) == prefix + data


def test_rows_hold_the_parsed_headers(store):
    subject = "=?utf-8?b?SGVsbG8gd8O2cmxk?="
    deliver(store, BOB, message(subject=subject, Cc="Carol <carol@example.test>"))
    [row] = query(
        store, 'SELECT "user", folder, tag, subject, from_addr, to_addrs, date FROM messages'
    )
    assert row == (
        "bob@example.test",
        "INBOX",
        "q1-0",
        "Hello w\u00f6rld",
        "Alice <alice@example.org>",
        '["bob@example.test", "carol@example.test"]',
        JAN_2024,
    )


def test_malformed_headers_are_still_stored(store, clock):
    data = b"Subject: =?bogus?q?x?=\r\nDate: yesterday-ish\r\nFrom: <<<\r\nTo: ,,,\r\n\xff\r\n\r\nx\r\n"
    deliver(store, BOB, data)
    [listed] = store.list_messages(BOB)
    assert store.read_message(BOB, listed.message_id).endswith(data)
    fields = parse_message(data, clock.now)
    assert fields.date == clock.now  # no readable Date: the delivery time


def test_unknown_ids_raise_key_error(store):
    deliver(store, BOB, message())
    [listed] = store.list_messages(BOB)
    for bad in ("999", "abc", "../1", "", "1; DROP TABLE messages"):
        with pytest.raises(KeyError):
            store.read_message(BOB, bad)
        with pytest.raises(KeyError):
            store.delete_message(BOB, bad)
    with pytest.raises(KeyError):  # another mailbox's message
        store.read_message(CAROL, listed.message_id)


def test_duplicates_found_by_tag(store):
    first = deliver(store, BOB, message(), tag="q7-1")
    assert store.has_delivered(BOB, "q7-1")
    assert not store.has_delivered(BOB, "q7-2")
    assert not store.has_delivered(CAROL, "q7-1")
    assert deliver(store, BOB, message(), tag="q7-1", check_existing=True) == first
    assert len(store.list_messages(BOB)) == 1
    deliver(store, BOB, message(), tag="q7-1")  # without check_existing: stored again
    assert len(store.list_messages(BOB)) == 2


def test_one_bad_item_does_not_stop_the_batch(store):
    items = [
        StoreItem(BOB, "a", b"", MemoryBody(message(subject="first"))),
        StoreItem(BOB, "b", b"", BrokenBody(message(subject="broken"))),
        StoreItem(CAROL, "c", b"", MemoryBody(message(subject="third"))),
    ]
    ok1, broken, ok2 = store.deliver_batch(items)
    assert isinstance(broken, OSError)
    assert ok1.startswith("sql:") and ok2.startswith("sql:")
    assert not store.has_delivered(BOB, "b")
    assert len(store.list_messages(BOB)) == len(store.list_messages(CAROL)) == 1
    assert store.search("broken") == []


class WatchedBody(MemoryBody):
    """Records whether the store's SQLite connection was inside a transaction
    while the body was read."""

    def __init__(self, data, store, seen):
        super().__init__(data)
        self.store, self.seen = store, seen

    def chunks(self, chunk_size=262144):
        with self.store._conn().read() as conn:
            self.seen.append(conn.in_transaction)
        yield from super().chunks(chunk_size)


def test_bodies_are_read_before_the_write_transaction_within_a_budget(sqlite_store, monkeypatch):
    """SQLite has one writer: reading and parsing under its lock kept the other
    delivery lane waiting.  Past the byte budget, bodies are read inside it, one
    at a time, rather than held all at once."""
    store, seen = sqlite_store, []
    deliver(store, BOB, message(), tag="opens-the-store")
    data = message(body="x" * 1000)
    batch = [StoreItem(BOB, f"t{i}", b"", WatchedBody(data, store, seen)) for i in range(4)]
    assert all(o.startswith("sql:") for o in store.deliver_batch(batch))
    assert seen == [False] * 4
    seen.clear()
    monkeypatch.setattr("mta.storage.sql._PREPARE_BUDGET", 2 * len(data) + 10)
    batch = [StoreItem(BOB, f"u{i}", b"", WatchedBody(data, store, seen)) for i in range(4)]
    assert all(o.startswith("sql:") for o in store.deliver_batch(batch))
    assert seen == [False, False, True, True]
    assert len(store.list_messages(BOB)) == 9


def test_a_failed_commit_fails_every_item(sqlite_store, tmp_path):
    store = sqlite_store
    deliver(store, BOB, message(), tag="first")  # opens the store
    other = sqlite3.connect(str(tmp_path / "mta.db"), timeout=0, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    with store._conn().read() as conn:
        conn.execute("PRAGMA busy_timeout = 0")
    try:
        outcomes = store.deliver_batch(
            [StoreItem(BOB, t, b"", MemoryBody(message())) for t in ("x", "y")]
        )
        for outcome in outcomes:  # an OSError: local delivery defers, 451 4.3.0
            assert isinstance(outcome, OSError)
            assert "mail database: database is locked" in str(outcome)
            assert isinstance(outcome.__cause__, sqlite3.OperationalError)
        with pytest.raises(sqlite3.OperationalError):
            store.probe()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store.probe() == "writable"
    assert [m.message_id for m in store.list_messages(BOB)] == ["1"]


def test_database_errors_become_os_errors():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13
    assert storage_error(full).errno == errno.ENOSPC
    other = ValueError("x")
    assert storage_error(other) is other


def test_delete_removes_from_search(store):
    deliver(store, BOB, message(subject="quarterly report"), tag="a")
    deliver(store, BOB, message(subject="quarterly figures"), tag="b")
    [hit2, hit1] = store.search("quarterly")  # same Date: the latest delivered first
    assert (hit1.subject, hit2.subject) == ("quarterly report", "quarterly figures")
    store.delete_message(BOB, hit1.message_id)
    assert [h.message_id for h in store.search("quarterly")] == [hit2.message_id]
    assert store.search("report") == []
    with pytest.raises(KeyError):
        store.delete_message(BOB, hit1.message_id)


def test_search_fields_order_and_filters(store, clock):
    deliver(store, BOB, message(subject="lunch", date="Tue, 2 Jan 2024 10:00:00 +0000"), tag="a")
    deliver(store, BOB, message(subject="other", body="lunch at noon"), tag="b")
    deliver(store, CAROL, message(subject="lunch", date="Wed, 3 Jan 2024 10:00:00 +0000"), tag="c")
    deliver(store, CAROL, message(subject="unrelated"), tag="d")
    hits = store.search("lunch")
    assert [(h.user, h.subject) for h in hits] == [
        ("carol@example.test", "lunch"),
        ("bob@example.test", "lunch"),
        ("bob@example.test", "other"),
    ]
    assert hits[0].date == JAN_2024 + 2 * 86400
    assert hits[0].from_addr == "Alice <alice@example.org>"
    assert [h.subject for h in store.search("LUNCH", user="Bob@Example.Test")] == [
        "lunch",
        "other",
    ]
    assert [h.user for h in store.search("lunch", since=JAN_2024 + 86400)] == [
        "carol@example.test",
        "bob@example.test",
    ]
    assert len(store.search("lunch", limit=1)) == 1
    assert len(store.search("alice example org")) == 4  # every word, any field
    assert len(store.search("lunch noon")) == 1
    assert len(store.search("carol@example.test")) == 0  # To: is bob in all of them


def test_search_matches_decoded_words_and_diacritics(store):
    deliver(store, BOB, message(subject="=?utf-8?q?Caf=C3=A9_cr=C3=A8me?="), tag="a")
    html = (
        b"Content-Type: text/html; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
        b"From: x@example.org\r\n\r\n<p>Gr=FC=DFe aus <b>M=FCnchen</b></p>\r\n"
    )
    deliver(store, BOB, html, tag="b")
    assert [h.subject for h in store.search("cafe")] == ["Caf\u00e9 cr\u00e8me"]
    assert len(store.search("creme")) == 1
    assert len(store.search("m\u00fcnchen")) == 1
    assert store.search("p") == []  # markup is not text


@pytest.mark.parametrize(
    "query",
    [
        '"',
        'a"b',
        "AND",
        "OR NOT",
        "foo*",
        "(lunch",
        "NEAR(a b)",
        "subject:lunch",
        "^lunch",
        "-lunch",
        "'; DROP TABLE messages; --",
        "lunch\x00",
        "{subject}: x",
        "",
        "   ",
        "***",
    ],
)
def test_hostile_queries_never_raise(store, query):
    deliver(store, BOB, message(subject="lunch AND dinner"))
    hits = store.search(query)
    assert isinstance(hits, list)
    assert len(store.list_messages(BOB)) == 1


def test_fts_query_quotes_every_word():
    assert fts_query('lunch a"b  NEAR(') == '"lunch" "a""b" "NEAR("'
    assert fts_query("  ") == ""


def test_remove_mailbox(store):
    deliver(store, BOB, message(subject="lunch"), tag="a")
    deliver(store, BOB, message(subject="lunch"), tag="b")
    deliver(store, CAROL, message(subject="lunch"), tag="c")
    assert store.create_mailbox(BOB) is None
    assert store.remove_mailbox(Address("bob", "EXAMPLE.test")) is True
    assert store.remove_mailbox(BOB) is False
    assert store.list_messages(BOB) == []
    assert not store.has_delivered(BOB, "a")
    assert [h.user for h in store.search("lunch")] == ["carol@example.test"]


def test_probe_leaves_nothing(store):
    assert store.probe() == "writable"
    assert store.probe() == "writable"
    assert query(store, "SELECT count(*) FROM messages") == [(0,)]


def test_shares_the_users_database(store):
    deliver(store, BOB, message())
    with Database(store.path) as db:
        db.add_user("dave@example.test", None)
        assert db.schema_version >= 3
    assert len(store.list_messages(BOB)) == 1


def test_concurrent_deliveries_from_two_threads(store):
    errors = []

    def work(box, name):
        try:
            for n in range(15):
                items = [
                    StoreItem(box, f"{name}-{n}-{k}", b"", MemoryBody(message(subject=name)))
                    for k in range(3)
                ]
                for outcome in store.deliver_batch(items):
                    assert isinstance(outcome, str), outcome
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [
        threading.Thread(target=work, args=(BOB, "left")),
        threading.Thread(target=work, args=(CAROL, "right")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    bob, carol = store.list_messages(BOB), store.list_messages(CAROL)
    assert len(bob) == len(carol) == 45
    assert len({m.message_id for m in bob + carol}) == 90
    assert len(store.search("left", limit=1000)) == 45


def test_local_delivery_of_a_queued_message(tmp_path, store):
    """The real path: a queue file (its trailer not copied) through LocalDelivery;
    a recovered entry is not stored twice."""
    from mta.delivery.local import LocalDelivery
    from mta.envelope import RecipientState
    from mta.queue.entry import QueueEntry
    from tests.queue.doubles import InlinePool, ThreadClock, envelope

    body = message(subject="queued") + b"\x80 8-bit\r\n"
    path = tmp_path / "0000000000000001"
    path.write_bytes(body + b'{"trailer": "not delivered"}')
    entry = QueueEntry(
        "0000000000000001",
        envelope("bob@example.test", "carol@example.test"),
        str(path),
        len(body),
        b"Received: from client\r\n",
    )
    agent = LocalDelivery(store, "mx.example.test", InlinePool(), ThreadClock())
    for recovered in (False, True):
        entry.recovered = recovered
        out = []
        agent.deliver(entry.job(), entry.envelope.recipients).addCallback(out.append)
        [results] = out
        assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    [listed] = store.list_messages(BOB)
    assert store.read_message(BOB, listed.message_id) == (
        b"Return-Path: <sender@remote.test>\r\nDelivered-To: bob@example.test\r\n"
        b"Received: from client\r\n" + body
    )
    assert len(store.list_messages(CAROL)) == 1
    assert [h.subject for h in store.search("queued")] == ["queued", "queued"]


def _single_and_multipart_messages():
    from email.message import EmailMessage

    out = []
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "Ä <a@x.test>", "b@y.test", "Grüße"
    m.set_content("héllo wörld\n" * 50)
    out.append(m.as_bytes())
    for cte in ("base64", "quoted-printable"):
        m = EmailMessage()
        m["Subject"] = cte
        m.set_content("ünïcode " * 200, cte=cte)
        out.append(m.as_bytes())
    m = EmailMessage()
    m["Subject"] = "html"
    m.set_content("<p>hi <b>there</b></p>", subtype="html")
    out.append(m.as_bytes())
    m = EmailMessage()
    m["Subject"] = "multi"
    m.set_content("plain part")
    m.add_alternative("<p>html part</p>", subtype="html")
    m.add_attachment(b"\x00\x01", maintype="application", subtype="octet-stream", filename="x.bin")
    out.append(m.as_bytes())
    out.append(
        b"Subject: raw\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        + "naïve café\r\n".encode() * 100
    )
    out.append(
        b"Subject: latin1\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\ncaf\xe9\r\n"
    )
    out.append(b"Subject: no body\r\n\r\n")
    out.append(b"no header fields at all, just text\r\n\r\nmore\r\n")
    return [m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in out]


@pytest.mark.parametrize("data", _single_and_multipart_messages())
def test_indexed_fields_are_those_of_the_full_parse(data):
    """parse_message skips the part-by-part parse of single-part messages: what it
    indexes must not change for it."""
    import email
    import email.policy

    from mta.storage import sqlparse
    from mta.storage.sqlparse import _body_text, _decoded, parse_message

    fields = parse_message(data, 1.0)
    msg = email.message_from_bytes(data, policy=sqlparse._POLICY)
    assert fields.text == _body_text(msg)
    assert fields.headers == [[name, _decoded(value)] for name, value in msg.items()]
    assert fields.subject == _decoded(msg.get("Subject", ""))


def test_8bit_header_fields_are_read_as_utf8(store):
    """RFC 6532 (SMTPUTF8) mail carries UTF-8 in its header fields, unencoded."""
    data = (
        "From: Jörg <jörg@bücher.example>\r\nTo: Zoë <zoe@example.test>\r\nSubject: Café crème\r\n"
    ).encode() + b"X-Broken: \xff\xfe\r\n\r\nbonjour\r\n"
    fields = parse_message(data, 0.0)
    assert fields.headers[-1] == ["X-Broken", "\ufffd\ufffd"]
    assert (fields.subject, fields.from_addr) == ("Café crème", "Jörg <jörg@bücher.example>")
    assert fields.to_text == "Zoë zoe@example.test"
    deliver(store, BOB, data, tag="u8")
    [hit] = store.search("creme jorg")
    assert (hit.subject, hit.from_addr) == ("Café crème", "Jörg <jörg@bücher.example>")
