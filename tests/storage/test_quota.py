"""`QuotaStore`: usage kept true above every backend, admission per batch, the 90%
warning, and what a broken database or store does.  Real stores, real SQLite."""

from __future__ import annotations

import os
import sqlite3

import pytest
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mta.db import MIB, Database
from mta.envelope import Address
from mta.interfaces import IMailStore
from mta.storage import StoreItem
from mta.storage.crypto import Keyring
from mta.storage.encrypted import EncryptingStore
from mta.storage.maildir import MaildirStore
from mta.storage.mbox import MboxStore
from mta.storage.quota import MailboxFull, QuotaStore, counted_size
from mta.storage.routing import RoutingStore
from mta.storage.sql import SQLStore
from mta.storage.timeseries import ArchiveStore
from mta.testing import MemoryBody

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")
NOBODY = Address("nobody", "example.test")  # a mailbox without a users row
PREFIX = b"Return-Path: <alice@remote.test>\r\nDelivered-To: bob@example.test\r\n"
MESSAGE = b"From: alice@remote.test\r\nSubject: hi\r\n\r\nFrom the start\r\nline two\r\n" * 20
KEYRING = Keyring.of(bytes(range(32)))

BACKENDS = {
    "maildir": lambda root: MaildirStore(str(root / "mail"), "mx.example.test"),
    "mbox": lambda root: MboxStore(str(root / "mail"), lock_timeout=10),
    "timeseries": lambda root: ArchiveStore(str(root / "archive")),
    "sql": lambda root: SQLStore(str(root / "mta.db")),
    "routing": lambda root: RoutingStore(
        MaildirStore(str(root / "mail"), "mx"), {"example.test": MboxStore(str(root / "mail"))}
    ),
    "encrypted-maildir": lambda root: EncryptingStore(
        MaildirStore(str(root / "mail"), "mx.example.test"), KEYRING
    ),
}


@pytest.fixture
def db(tmp_path):
    with Database(str(tmp_path / "mta.db")) as database:
        database.add_user("bob@example.test")
        database.add_user("carol@example.test")
        yield database


@pytest.fixture(params=sorted(BACKENDS))
def store(request, tmp_path, db):
    inner = BACKENDS[request.param](tmp_path)
    yield QuotaStore(inner, lambda: db)
    close = getattr(inner, "close", None)
    if close is not None:
        close()


@pytest.fixture
def maildir(tmp_path, db):
    return QuotaStore(MaildirStore(str(tmp_path / "mail"), "mx"), lambda: db)


def item(mailbox, tag, data=MESSAGE, *, check_existing=False, prefix=PREFIX):
    return StoreItem(mailbox, tag, prefix, MemoryBody(data), check_existing)


def used(db, who="bob@example.test") -> int:
    return db.require_user(who).used_bytes


def test_interface(maildir):
    assert verifyObject(IMailStore, maildir)


def test_delivery_adds_the_delivered_size_and_delete_gives_it_back(store, db):
    one, two = item(BOB, "00aa-0"), item(BOB, "00ab-0", MESSAGE * 3)
    three = item(CAROL, "00ab-1")
    outcomes = store.deliver_batch([one, two, three])
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert used(db) == one.size + two.size
    assert used(db, "carol@example.test") == three.size
    assert db.require_user("bob@example.test").used_mb == 1  # rounded up to whole MiB
    first, second = store.list_messages(BOB)
    store.delete_message(BOB, second.message_id)
    assert used(db) == one.size  # exactly what delivery charged, mbox's LF included
    store.delete_message(BOB, first.message_id)
    assert used(db) == 0 and db.require_user("bob@example.test").used_mb == 0
    with pytest.raises(KeyError):
        store.delete_message(BOB, first.message_id)
    assert used(db) == 0


def test_recount_agrees_with_what_delivery_counted(store, db):
    items = [item(BOB, f"00a{i}-0", MESSAGE * (i + 1)) for i in range(3)]
    store.deliver_batch(items)
    counted = used(db)
    db.set_usage("bob@example.test", 12345)  # drift (a crash between charge and store)
    assert store.recount(BOB) == counted == sum(i.size for i in items)
    assert used(db) == counted


def test_counted_size_measures_lf_messages_as_crlf():
    assert counted_size(b"a\r\nb\r\n") == 6
    assert counted_size(b"a\nb\n") == 6
    assert counted_size(b"bare\rCR\r\n") == 9


def test_a_mailbox_without_a_user_row_is_delivered_and_not_counted(maildir, db):
    [outcome] = maildir.deliver_batch([item(NOBODY, "00aa-0")])
    assert isinstance(outcome, str)
    assert [u.used_bytes for u in db.list_users()] == [0, 0]


def test_items_that_do_not_fit_are_refused_in_order_and_not_stored(maildir, db):
    db.set_quota("bob@example.test", 1)
    big = b"x" * (MIB // 2) + b"\r\n"
    first, second, small = item(BOB, "00aa-0", big), item(BOB, "00aa-1", big), item(BOB, "00aa-2")
    outcomes = maildir.deliver_batch([first, second, small, item(CAROL, "00aa-3", big)])
    assert isinstance(outcomes[0], str)
    assert isinstance(outcomes[1], MailboxFull)
    assert "mailbox bob@example.test is over its quota" in str(outcomes[1])
    assert isinstance(outcomes[2], str)  # a smaller one that still fits goes in
    assert isinstance(outcomes[3], str)  # carol has no quota
    assert used(db) == first.size + small.size
    assert len(maildir.list_messages(BOB)) == 2


def test_a_copy_already_stored_is_not_counted_twice(maildir, db):
    maildir.deliver_batch([item(BOB, "00aa-0")])
    once = used(db)
    [again] = maildir.deliver_batch([item(BOB, "00aa-0", check_existing=True)])
    assert isinstance(again, str)
    assert used(db) == once and len(maildir.list_messages(BOB)) == 1


def test_a_copy_already_stored_is_not_refused_by_a_full_mailbox(maildir, db):
    maildir.deliver_batch([item(BOB, "00aa-0")])
    db.set_quota("bob@example.test", 1)
    db.set_usage("bob@example.test", MIB)
    [again] = maildir.deliver_batch([item(BOB, "00aa-0", check_existing=True)])
    assert isinstance(again, str)


class ShortBody(MemoryBody):
    """A queued body shorter than its recorded size (a damaged spool file)."""

    @property
    def size(self) -> int:
        return len(self.data) + 10


def test_what_the_store_failed_to_take_is_given_back(maildir, db):
    bad = StoreItem(BOB, "00aa-0", PREFIX, ShortBody(MESSAGE))
    good = item(BOB, "00aa-1")
    outcomes = maildir.deliver_batch([bad, good])
    assert isinstance(outcomes[0], OSError) and isinstance(outcomes[1], str)
    assert used(db) == good.size


def test_a_locked_database_defers_the_batch_and_stores_nothing(tmp_path, db):
    impatient = Database(str(tmp_path / "mta.db"), timeout=0.05)
    store = QuotaStore(MaildirStore(str(tmp_path / "mail"), "mx"), lambda: impatient)
    try:
        with db.transaction():  # another process holds the write lock
            outcomes = store.deliver_batch([item(BOB, "00aa-0"), item(CAROL, "00aa-1")])
    finally:
        impatient.close()
    assert all(isinstance(o, OSError) for o in outcomes)
    assert "quota accounting failed" in str(outcomes[0])
    assert store.list_messages(BOB) == []


def test_usage_never_goes_below_zero(maildir, db):
    maildir.deliver_batch([item(BOB, "00aa-0")])
    db.set_usage("bob@example.test", 10)  # drifted low
    [message] = maildir.list_messages(BOB)
    maildir.delete_message(BOB, message.message_id)
    assert used(db) == 0


def test_removing_a_mailbox_zeroes_its_usage(maildir, db):
    maildir.deliver_batch([item(BOB, "00aa-0")])
    assert maildir.remove_mailbox(BOB)
    assert used(db) == 0
    assert not maildir.remove_mailbox(NOBODY)


def test_warns_once_when_crossing_90_percent(maildir, db):
    db.set_quota("bob@example.test", 1)
    events = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        tenth = b"x" * (MIB // 10 + 10 - len(PREFIX) - 2) + b"\r\n"  # a bit over 10%

        def warnings():
            return [e for e in events if e.get("event") == "quota_warning"]

        maildir.deliver_batch([item(BOB, f"00a{i}-0", tenth) for i in range(8)])  # 80%
        assert warnings() == []
        maildir.deliver_batch([item(BOB, "00b0-0", tenth)])  # 90%: crossed
        assert len(warnings()) == 1
        assert warnings()[0]["mailbox"] == "bob@example.test"
        assert warnings()[0]["percent"] >= 90
        maildir.deliver_batch([item(BOB, "00b1-0", b"small\r\n")])  # still above
        assert len(warnings()) == 1
        for message in maildir.list_messages(BOB)[:3]:
            maildir.delete_message(BOB, message.message_id)  # back to ~70%
        maildir.deliver_batch([item(BOB, f"00c{i}-0", tenth) for i in range(3)])
        assert len(warnings()) == 2  # a new crossing
    finally:
        globalLogPublisher.removeObserver(observer)


def test_the_refusal_is_decided_by_one_transaction_across_connections(tmp_path, db):
    """Two worker processes (two connections) cannot both fill the last megabyte."""
    db.set_quota("bob@example.test", 1)
    half = b"x" * (MIB // 2 + 1000) + b"\r\n"
    with Database(str(tmp_path / "mta.db")) as other:
        a = QuotaStore(MaildirStore(str(tmp_path / "mail"), "a"), lambda: db)
        b = QuotaStore(MaildirStore(str(tmp_path / "mail"), "b"), lambda: other)
        [first] = a.deliver_batch([item(BOB, "00aa-0", half)])
        [second] = b.deliver_batch([item(BOB, "00aa-1", half)])
    assert isinstance(first, str) and isinstance(second, MailboxFull)


def test_sqlite_error_from_add_usage_on_delete_is_raised(tmp_path, db, maildir):
    maildir.deliver_batch([item(BOB, "00aa-0")])
    [message] = maildir.list_messages(BOB)
    impatient = Database(str(tmp_path / "mta.db"), timeout=0.05)
    store = QuotaStore(maildir.inner, lambda: impatient)
    try:
        with db.transaction(), pytest.raises(sqlite3.OperationalError):
            store.delete_message(BOB, message.message_id)
    finally:
        impatient.close()


@pytest.mark.parametrize("backend", ["maildir", "encrypted-maildir"])
def test_a_retried_batch_lists_each_mailbox_once(backend, tmp_path, db, monkeypatch):
    """Retried deliveries ask whether each copy is already there; a Maildir answers
    from one listing per mailbox and batch, not one per message (a drain into a
    large mailbox was quadratic)."""
    store = QuotaStore(BACKENDS[backend](tmp_path), lambda: db)
    first = [item(BOB, f"00aa-{i}") for i in range(0, 10, 2)] + [item(CAROL, "00cc-0")]
    stored = store.deliver_batch(first)
    retried = [item(BOB, f"00aa-{i}", check_existing=True) for i in range(10)]
    retried += [item(CAROL, f"00cc-{i}", check_existing=True) for i in range(2)]
    before = used(db)
    listings = []
    real_listdir, real_scandir = os.listdir, os.scandir
    monkeypatch.setattr(os, "listdir", lambda p: listings.append(p) or real_listdir(p))
    monkeypatch.setattr(os, "scandir", lambda p: listings.append(p) or real_scandir(p))
    outcomes = store.deliver_batch(retried)
    monkeypatch.undo()
    # QuotaStore's question, then the store's own: new/ and cur/ twice per mailbox
    assert len(listings) <= 2 * 2 * 2, listings
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert [outcomes[i] for i in (0, 2, 4, 6, 8, 10)] == stored  # the copies already there
    assert len(store.list_messages(BOB)) == 10 and len(store.list_messages(CAROL)) == 2
    assert used(db) == before + 5 * len(PREFIX + MESSAGE)
