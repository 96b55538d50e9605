"""Local delivery through the `QuotaStore`: a full mailbox is a permanent 5.2.2
failure for its recipient only; what is delivered is charged to its user."""

from __future__ import annotations

import pytest

from mta.db import MIB, Database
from mta.delivery.local import LocalDelivery
from mta.envelope import RecipientState
from mta.queue.entry import QueueEntry
from mta.storage.maildir import MaildirStore
from mta.storage.quota import QuotaStore
from tests.queue.doubles import InlinePool, ThreadClock, envelope

BODY = b"Subject: hi\r\n\r\n" + b"x" * 4000 + b"\r\n"
TRACE = b"Received: from client\r\n"


@pytest.fixture
def db(tmp_path):
    with Database(str(tmp_path / "mta.db")) as database:
        database.add_user("bob@example.test", quota_mb=1)
        database.add_user("carol@example.test")
        yield database


@pytest.fixture
def agent(tmp_path, db):
    store = QuotaStore(MaildirStore(str(tmp_path / "mail"), "mx"), lambda: db)
    return LocalDelivery(store, "mx.example.test", InlinePool(), ThreadClock())


def deliver(agent, tmp_path, *rcpts):
    path = tmp_path / "queued"
    path.write_bytes(BODY)
    entry = QueueEntry("0000000000000001", envelope(*rcpts), str(path), len(BODY), TRACE)
    out = []
    agent.deliver(entry.job(), entry.pending_recipients()).addCallback(out.append)
    [results] = out
    return results


def test_a_full_mailbox_fails_its_recipient_permanently_with_5_2_2(agent, tmp_path, db):
    db.set_usage("bob@example.test", MIB - 100)
    bob, carol = deliver(agent, tmp_path, "bob@example.test", "carol@example.test")
    assert bob.state is RecipientState.FAILED
    assert (bob.reply.code, bob.reply.enhanced) == (552, "5.2.2")
    assert "mailbox bob@example.test is over its quota" in bob.detail
    assert carol.state is RecipientState.DELIVERED
    assert not (tmp_path / "mail/example.test/bob").exists()


def test_delivered_mail_is_charged_with_its_delivery_headers(agent, tmp_path, db):
    [bob] = deliver(agent, tmp_path, "bob@example.test")
    assert bob.state is RecipientState.DELIVERED
    prefix = b"Return-Path: <sender@remote.test>\r\nDelivered-To: bob@example.test\r\n"
    assert db.require_user("bob@example.test").used_bytes == len(prefix + TRACE + BODY)
