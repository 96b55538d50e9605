"""`QuotaCheck` at RCPT and DATA, over the real `UserDirectory` and a real SQLite
database (the "thread pool" runs inline, the refresh loop on a `task.Clock`)."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mta.config import build_config
from mta.db import MIB, Database
from mta.db.directory import UserDirectory
from mta.envelope import Address
from mta.interfaces import IPolicyCheck
from mta.policy.pipeline import PolicyPipeline
from mta.policy.quota import QuotaCheck, refusal
from mta.policy.relay import RelayCheck
from mta.policy.verdict import Action, Phase, PolicyContext
from mta.testing import FakeDirectory
from tests.smtp.helpers import make_harness

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")
REMOTE = Address("someone", "remote.test")
KB = 1024


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


def value(result):
    """The verdict, whether answered at once or through a fired Deferred."""
    if isinstance(result, defer.Deferred):
        out = []
        result.addBoth(out.append)
        assert out, "the check has not answered"
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]
    return result


@pytest.fixture
def config(tmp_path):
    return build_config(
        {
            "hostname": "mx.example.test",
            "datadir": str(tmp_path),
            "local_domains": ["example.test"],
            "postmaster": "bob@example.test",
        }
    )


@pytest.fixture
def admin(config):
    """mta-admin (and the delivery side) on their own connection."""
    with Database(config.path("mta.db")) as db:
        db.add_user("bob@example.test")
        db.add_user("carol@example.test")
        db.add_alias("team@example.test", ["bob@example.test", "carol@example.test"])
        yield db


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def directory(config, clock, admin):
    d = UserDirectory(config, config.path("mta.db"), clock, None, run_in_thread=run_now)
    d.startService()
    yield d
    d.stopService()


@pytest.fixture
def check(directory):
    return QuotaCheck(directory)


def rcpt(check, recipient, size=0):
    context = PolicyContext("192.0.2.1", "smtp", recipient=recipient, size=size)
    return value(check.check(Phase.RCPT, context))


def data(check, recipients, size):
    context = PolicyContext("192.0.2.1", "smtp", recipients=tuple(recipients), size=size)
    return value(check.check(Phase.DATA, context))


def settle(clock, directory):
    """One refresh tick: the directory sees what the other connection committed."""
    clock.advance(directory._refresh_interval)


def code(verdict):
    return None if verdict.reply is None else (verdict.reply.code, verdict.reply.enhanced)


def test_interface(check):
    assert verifyObject(IPolicyCheck, check)
    assert set(check.phases) == {Phase.RCPT, Phase.DATA}


def test_the_rule():
    assert refusal(MIB, 0, MIB) is None  # exactly full is still in
    assert code_of(refusal(MIB, 0, MIB + 1)) == (552, "5.2.2")
    assert code_of(refusal(MIB, MIB // 2, MIB // 2 + 1)) == (452, "4.2.2")
    assert code_of(refusal(MIB, MIB, 0)) == (452, "4.2.2")  # full: nothing fits
    assert refusal(MIB, MIB - 1, 0) is None


def code_of(reply):
    return (reply.code, reply.enhanced)


def test_without_quotas_the_answer_is_immediate(check):
    # No Deferred, no database read: the snapshot says nobody has a quota.
    assert check.check(
        Phase.RCPT, PolicyContext("c", "smtp", recipient=BOB, size=10**9)
    ).action in (
        Action.CONTINUE,
        Action.ACCEPT,
    )
    verdict = check.check(Phase.DATA, PolicyContext("c", "smtp", recipients=(BOB,), size=10**9))
    assert not isinstance(verdict, defer.Deferred) and not verdict.refuses


def test_rcpt_452_when_used_plus_size_is_over(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    admin.set_usage("bob@example.test", 900 * KB)
    settle(clock, directory)
    assert code(rcpt(check, BOB, size=200 * KB)) == (452, "4.2.2")
    assert not rcpt(check, BOB, size=100 * KB).refuses  # still fits
    assert not rcpt(check, BOB).refuses  # no SIZE=: room is left
    assert not rcpt(check, CAROL, size=200 * KB).refuses  # no quota


def test_rcpt_552_when_the_message_alone_is_over(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    settle(clock, directory)
    verdict = rcpt(check, BOB, size=MIB + 1)
    assert verdict.action is Action.REJECT and code(verdict) == (552, "5.2.2")


def test_rcpt_452_for_a_full_mailbox_without_size(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    admin.set_usage("bob@example.test", MIB)
    settle(clock, directory)
    verdict = rcpt(check, BOB)
    assert verdict.action is Action.TEMPFAIL and code(verdict) == (452, "4.2.2")


def test_an_alias_is_refused_only_when_none_of_its_mailboxes_has_room(
    check, admin, clock, directory
):
    team = Address("team", "example.test")
    admin.set_quota("bob@example.test", 1)
    admin.set_usage("bob@example.test", MIB)
    settle(clock, directory)
    assert not rcpt(check, team, size=KB).refuses  # carol has no quota
    admin.set_quota("carol@example.test", 1)
    admin.set_usage("carol@example.test", MIB)
    settle(clock, directory)
    assert code(rcpt(check, team, size=KB)) == (452, "4.2.2")
    assert code(rcpt(check, team, size=2 * MIB)) == (552, "5.2.2")


def test_remote_recipients_have_no_quota(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    settle(clock, directory)
    assert not rcpt(check, REMOTE, size=10 * MIB).refuses


def test_data_552_when_every_recipient_is_over(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    admin.set_quota("carol@example.test", 2)
    admin.set_usage("bob@example.test", 900 * KB)
    admin.set_usage("carol@example.test", 1900 * KB)
    settle(clock, directory)
    verdict = data(check, [BOB, CAROL], 200 * KB)
    assert verdict.action is Action.REJECT and code(verdict) == (552, "5.2.2")
    assert not data(check, [BOB, CAROL], 100 * KB).refuses


def test_data_accepts_when_only_some_recipients_are_over(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    admin.set_usage("bob@example.test", 900 * KB)
    settle(clock, directory)
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert not data(check, [BOB, CAROL], 200 * KB).refuses
        assert not data(check, [BOB, REMOTE], 200 * KB).refuses
    finally:
        globalLogPublisher.removeObserver(events.append)
    partial = [e for e in events if e.get("event") == "quota_partial"]
    assert len(partial) == 2 and partial[0]["over"] == "bob@example.test"


def test_usage_is_read_once_per_change_of_the_database(check, admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    settle(clock, directory)
    assert not rcpt(check, BOB, size=200 * KB).refuses  # reads and keeps usage 0
    reads = []
    real = directory._db.quota_usage
    directory._db.quota_usage = lambda keys: reads.append(keys) or real(keys)
    assert not rcpt(check, BOB, size=200 * KB).refuses
    assert reads == []  # answered from memory
    admin.add_usage({"bob@example.test": 900 * KB})  # a delivery commits
    settle(clock, directory)
    assert code(rcpt(check, BOB, size=200 * KB)) == (452, "4.2.2")
    assert reads == [["bob@example.test"]]


def test_a_quota_change_reaches_the_check_at_the_next_tick(check, admin, clock, directory):
    assert not rcpt(check, BOB, size=2 * MIB).refuses
    admin.set_quota("bob@example.test", 1)
    settle(clock, directory)
    assert code(rcpt(check, BOB, size=2 * MIB)) == (552, "5.2.2")
    admin.set_quota("bob@example.test", None)
    settle(clock, directory)
    assert not rcpt(check, BOB, size=2 * MIB).refuses


def test_in_the_pipeline_after_the_relay_rule(admin, clock, directory):
    admin.set_quota("bob@example.test", 1)
    settle(clock, directory)
    pipeline = PolicyPipeline(
        [RelayCheck(["example.test"], [], directory), QuotaCheck(directory)], clock
    )
    context = PolicyContext("192.0.2.1", "smtp", recipient=BOB, size=2 * MIB)
    assert code(value(pipeline.run(Phase.RCPT, context))) == (552, "5.2.2")
    unknown = context._replace(recipient=Address("nobody", "example.test"))
    assert code(value(pipeline.run(Phase.RCPT, unknown))) == (550, "5.1.1")
    fine = context._replace(size=KB)
    verdict = value(pipeline.run(Phase.RCPT, fine))
    assert verdict.action is Action.ACCEPT and verdict.recipients == (BOB,)


def test_a_slow_directory_is_waited_for():
    directory = FakeDirectory({"bob@example.test": ("bob@example.test",)}, deferred=True)
    directory.quotas = {"bob@example.test": (MIB, MIB)}
    d = QuotaCheck(directory).check(Phase.RCPT, PolicyContext("c", "smtp", recipient=BOB))
    assert isinstance(d, defer.Deferred) and not d.called
    directory.flush()
    assert code(value(d)) == (452, "4.2.2")


def test_the_session_hands_size_to_the_rcpt_check_and_answers_in_order():
    """Protocol level (StringTransport): SIZE= from MAIL reaches the RCPT check;
    with PIPELINING the replies come in order; the 552 after DATA commits nothing."""
    directory = FakeDirectory(
        {"bob@example.test": ("bob@example.test",), "carol@example.test": ("carol@example.test",)}
    )
    directory.quotas = {"bob@example.test": (MIB, 900 * KB)}
    h = make_harness(directory=directory, checks=[QuotaCheck(directory)])
    h.ehlo()
    h.send(
        f"MAIL FROM:<s@remote.test> SIZE={200 * KB}\r\nRCPT TO:<bob@example.test>\r\n"
        "RCPT TO:<carol@example.test>\r\nRSET\r\n"
        f"MAIL FROM:<s@remote.test> SIZE={2 * MIB}\r\nRCPT TO:<bob@example.test>\r\nRSET\r\n"
        "MAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
    )
    assert h.codes() == ["250", "452", "250", "250", "250", "552", "250", "250", "250", "354"]
    h.send(b"Subject: big\r\n\r\n" + b"x" * 200 * KB + b"\r\n.\r\n")
    [reply] = h.replies()
    assert reply.startswith("552 5.2.2 ")
    assert h.spool.committed == []
