"""Local delivery: headers, error mapping, batching, no duplicates on recovery."""

from __future__ import annotations

import errno
import os

import pytest
from zope.interface.verify import verifyObject

from mta.delivery.local import LocalDelivery
from mta.envelope import Address, RecipientState
from mta.interfaces import IDeliveryAgent, IMailStore
from mta.queue.entry import QueueEntry
from mta.storage import StoreItem
from mta.storage.maildir import MaildirStore
from mta.testing import MemoryBody, MemoryMailStore
from tests.queue.doubles import FsyncCounter, InlinePool, ManualPool, ThreadClock, envelope

BODY = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def make_entry(tmp_path):
    counter = iter(range(1000))

    def make(*rcpts, recovered=False):
        qid = f"{next(counter):016x}"
        path = tmp_path / qid
        path.write_bytes(BODY + b'{"trailer": "not delivered"}')
        return QueueEntry(
            qid,
            envelope(*rcpts),
            str(path),
            len(BODY),
            b"Received: from client\r\n",
            recovered=recovered,
        )

    return make


def deliver(agent, entry):
    out = []
    agent.deliver(entry.job(), entry.pending_recipients()).addCallback(out.append)
    [results] = out
    return results


def test_interface(tmp_path):
    agent = LocalDelivery(MaildirStore(str(tmp_path)), "mx", InlinePool(), ThreadClock())
    assert verifyObject(IDeliveryAgent, agent)


def test_delivers_with_return_path_and_delivered_to(tmp_path, make_entry):
    store = MaildirStore(str(tmp_path / "mail"))
    agent = LocalDelivery(store, "mx.example.test", InlinePool(), ThreadClock())
    entry = make_entry("bob@example.test", "carol@example.test")
    results = deliver(agent, entry)
    assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    [name] = os.listdir(tmp_path / "mail/example.test/bob/new")
    data = (tmp_path / "mail/example.test/bob/new" / name).read_bytes()
    assert (
        data
        == b"Return-Path: <sender@remote.test>\r\nDelivered-To: bob@example.test\r\nReceived: from client\r\n"
        + BODY
    )
    assert os.listdir(tmp_path / "mail/example.test/carol/new")


class FullDisk(MaildirStore):
    def _write_one(self, box, item):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_is_transient(tmp_path, make_entry):
    agent = LocalDelivery(FullDisk(str(tmp_path)), "mx", InlinePool(), ThreadClock())
    [result] = deliver(agent, make_entry("bob@example.test"))
    assert result.state is RecipientState.DEFERRED
    assert result.reply.code == 452 and result.reply.enhanced == "4.3.1"


def test_mailbox_parent_is_a_file_is_transient(tmp_path, make_entry):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "example.test").write_bytes(b"oops")
    agent = LocalDelivery(MaildirStore(str(tmp_path / "mail")), "mx", InlinePool(), ThreadClock())
    [result] = deliver(agent, make_entry("bob@example.test"))
    assert result.state is RecipientState.DEFERRED and result.reply.code == 451


def test_unsafe_mailbox_name_fails_permanently(tmp_path, make_entry):
    agent = LocalDelivery(MaildirStore(str(tmp_path)), "mx", InlinePool(), ThreadClock())
    bad, good = deliver(agent, make_entry(".hidden@example.test", "ok@example.test"))
    assert bad.state is RecipientState.FAILED and bad.reply.enhanced == "5.1.1"
    assert good.state is RecipientState.DELIVERED


class Exploding(MaildirStore):
    def _write_one(self, box, item):
        raise KeyError("bug")


def test_unexpected_error_defers(tmp_path, make_entry):
    agent = LocalDelivery(Exploding(str(tmp_path)), "mx", InlinePool(), ThreadClock())
    [result] = deliver(agent, make_entry("bob@example.test"))
    assert result.state is RecipientState.DEFERRED


def test_calls_during_a_batch_form_the_next_batch(tmp_path, make_entry):
    fsync = FsyncCounter()
    store = MaildirStore(str(tmp_path), fsync=fsync)
    pool = ManualPool()
    agent = LocalDelivery(store, "mx", pool, ThreadClock(), lanes=1)
    got = []
    for _ in range(4):
        e = make_entry("bob@example.test")
        agent.deliver(e.job(), e.pending_recipients()).addCallback(got.append)
    assert len(pool.queue) == 1
    pool.run_one()
    assert len(got) == 1 and len(pool.queue) == 1
    fsync.dirs = 0
    pool.run_one()
    assert len(got) == 4 and agent.batches == 2
    assert fsync.dirs == 1  # three messages into one new/: one directory fsync
    assert len(os.listdir(tmp_path / "example.test/bob/new")) == 4


def test_recovered_entry_is_not_delivered_twice(tmp_path, make_entry):
    store = MaildirStore(str(tmp_path))
    agent = LocalDelivery(store, "mx", InlinePool(), ThreadClock())
    entry = make_entry("bob@example.test", "carol@example.test")
    bob = entry.envelope.recipients[0]
    # The crash window: bob's copy reached new/ but the queue never recorded it.
    store.deliver_batch([StoreItem(bob, entry.job().message_tag(bob), b"", entry.body)])
    entry.recovered = True
    results = deliver(agent, entry)
    assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    assert len(os.listdir(tmp_path / "example.test/bob/new")) == 1
    assert len(os.listdir(tmp_path / "example.test/carol/new")) == 1


def test_any_mail_store_through_the_interface_only(make_entry):
    """Local delivery asks nothing of a store but IMailStore: an in-memory one."""
    store = MemoryMailStore()
    assert verifyObject(IMailStore, store)
    agent = LocalDelivery(store, "mx", InlinePool(), ThreadClock())
    entry = make_entry("a@example.test", "b@example.test", recovered=True)
    a = entry.envelope.recipients[0]
    store.deliver_batch([StoreItem(a, f"{entry.qid}-0", b"", MemoryBody(b"old copy"))])
    results = deliver(agent, entry)
    assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    # a's copy is already there (a recovered job is checked first), so only b is stored
    assert [(m, tag) for m, tag, _ in store.stored][1:] == [
        (Address("b", "example.test"), f"{entry.qid}-1")
    ]
    assert store.stored[1][2] == (
        b"Return-Path: <sender@remote.test>\r\nDelivered-To: b@example.test\r\n"
        b"Received: from client\r\n" + BODY
    )


def test_a_first_attempt_is_not_checked_for_copies_a_retry_is(make_entry):
    checks = []

    class Recording(MemoryMailStore):
        def deliver_batch(self, items):
            checks.extend(item.check_existing for item in items)
            return super().deliver_batch(items)

    agent = LocalDelivery(Recording(), "mx", InlinePool(), ThreadClock())
    entry = make_entry("bob@example.test")
    deliver(agent, entry)
    entry.attempts = 1
    deliver(agent, entry)
    assert checks == [False, True]
