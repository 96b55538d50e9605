"""`mta-admin spam learn`: TELL a real spamd about quarantined and delivered messages."""

from __future__ import annotations

import socket
import uuid

import attrs
import pytest

from mta.config import load_config
from mta.delivery.quarantine import QuarantineAgent
from mta.envelope import Address, DeliveryJob
from mta.policy.spamd import spam_headers
from mta.storage import StoreItem, open_store
from mta.testing import MemoryBody
from tests.policy.conftest import GTUBE, bayes_counts, spamd_server  # noqa: F401 (fixture)
from tests.queue.doubles import InlinePool, ThreadClock, envelope

QID = "00000000000bb0000010001"
BOB = Address("bob", "example.test")


def message(text: bytes) -> bytes:
    """A message spamd's Bayes has not seen (it knows one by Message-ID, Date and body)."""
    tag = uuid.uuid4().hex.encode()
    return (
        b"From: someone@remote.test\r\nTo: bob@example.test\r\nSubject: hello\r\n"
        b"Message-ID: <" + tag + b"@remote.test>\r\n"
        b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n" + text + b"\r\nref " + tag + b"\r\n"
    )


def quarantine(datadir, data: bytes, qid: str = QID) -> None:
    clock = ThreadClock()
    agent = QuarantineAgent(str(datadir / "quarantine"), InlinePool(), clock)
    env = attrs.evolve(envelope("bob@example.test"), quarantine="spam (score 1000)")
    done = []
    agent.deliver(DeliveryJob(qid, env, MemoryBody(data)), env.recipients).addCallback(done.append)
    assert done, "the agent did not answer"


@pytest.fixture
def spamd_config(config_file, spamd_server):  # noqa: F811 (the fixture imported above)
    with open(config_file, "a") as f:
        f.write(f'\n[checks]\nspamd = "{spamd_server.address}"\n')
    return spamd_server


def test_learn_a_quarantined_message_as_spam(run, datadir, spamd_config):
    tags = b"".join(spam_headers(1000.0, 5.0, ["GTUBE"], True))
    quarantine(datadir, tags + message(b"cheap watches\r\n" + GTUBE))
    spam, ham = bayes_counts(spamd_config)
    status, out, err = run("spam", "learn", "--spam", QID)
    assert (status, err) == (0, "")
    assert out == f"{QID}: spamd learned it as spam\n"
    assert bayes_counts(spamd_config) == (spam + 1, ham)
    # Learning does not move the message; a second time changes nothing.
    status, out, _ = run("spam", "learn", "--spam", QID)
    assert (status, out) == (0, f"{QID}: spamd already knew it as spam (nothing changed)\n")
    assert bayes_counts(spamd_config) == (spam + 1, ham)
    assert run("quarantine", "list")[1].count(QID) == 1


@pytest.mark.parametrize("backend", ["maildir", "mbox"])  # an mbox gives LF lines back
def test_learn_a_delivered_message_as_ham(run, config_file, spamd_config, backend):
    with open(config_file, "a") as f:
        f.write(f'\n[storage]\nbackend = "{backend}"\n')
    store = open_store(load_config(config_file))
    tags = b"".join(spam_headers(0.1, 5.0, ["NO_RELAYS"], False))
    data = tags + message(b"lunch at noon?")
    [outcome] = store.deliver_batch([StoreItem(BOB, "00cc-0", b"", MemoryBody(data))])
    assert isinstance(outcome, str)
    [stored] = store.list_messages(BOB)
    spam, ham = bayes_counts(spamd_config)
    status, out, err = run(
        "spam", "learn", "--ham", "--user", "Bob@example.test", stored.message_id
    )
    assert (status, err) == (0, "")
    assert out == f"{stored.message_id} of Bob@example.test: spamd learned it as ham\n"
    assert bayes_counts(spamd_config) == (spam, ham + 1)


def test_unknown_ids(run, spamd_config):
    status, _, err = run("spam", "learn", "--spam", "0123abcd")
    assert status == 1
    assert "0123abcd: no such message in the quarantine (for a delivered message, give" in err
    status, _, err = run("spam", "learn", "--ham", "--user", "bob@example.test", "nope")
    assert (status, err) == (1, "mta-admin: bob@example.test: no message nope\n")


def test_spamd_not_configured(run, datadir):
    quarantine(datadir, message(b"hi"))
    status, _, err = run("spam", "learn", "--spam", QID)
    assert status == 1
    assert "[checks] spamd is not set in " in err and "there is no spamd to teach" in err


def test_spamd_unreachable(run, config_file, datadir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with open(config_file, "a") as f:
        f.write(f'\n[checks]\nspamd = "{address}"\n')
    quarantine(datadir, message(b"hi"))
    status, _, err = run("spam", "learn", "--ham", QID)
    assert status == 1
    assert err.startswith(f"mta-admin: {QID}: cannot reach spamd at {address}: ")


def test_spam_or_ham_is_required(run):
    assert run("spam", "learn", QID)[0] == 2
    assert run("spam", "learn", "--spam", "--ham", QID)[0] == 2
