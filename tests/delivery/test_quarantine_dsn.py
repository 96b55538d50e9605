"""Quarantine and DSNs: a quarantined message finishes in the queue without any notice
to its (possibly forged) sender, and a release carries the DSN request on, so the
released message is delivered and reported as it would have been."""

from __future__ import annotations

import attrs
import pytest

from mta.delivery import quarantine as q
from mta.delivery.router import Router
from mta.envelope import Address, Envelope
from mta.queue.filestore import FileQueueStore
from tests.queue.doubles import InlinePool, ThreadClock
from tests.queue.test_dsn import BODY, SENDER, TRACE, Agent, addr, make, queued, report

NOTIFY_ALL = "SUCCESS,DELAY,FAILURE"


@pytest.fixture
def clock():
    return ThreadClock()


def submit_quarantined(spool: FileQueueStore, *rcpts: str, notify, reason="spam (score 9)"):
    env = Envelope(
        sender=SENDER,
        recipients=tuple(addr(r) for r in rcpts),
        received_at=spool.reactor.seconds(),
        dsn_ret="FULL",
        dsn_envid="ENV-7",
        dsn_notify=tuple(notify),
        dsn_orcpt=tuple(f"rfc822;{r}" for r in rcpts),
        quarantine=reason,
    )
    f = spool.open(spool.new_queue_id())
    f.write(BODY)
    return f.commit(env, TRACE)


def quarantine_router(tmp_path, clock, agent, directory=None):
    directory = directory or str(tmp_path / "quarantine")
    held = q.QuarantineAgent(directory, InlinePool(), clock)
    return Router(["example.test"], agent, remote_agent=agent, quarantine_agent=held)


def test_quarantine_sends_no_success_notice(tmp_path, clock):
    agent = Agent()  # records any DSN the queue writes to the sender
    spool, _ = make(tmp_path, clock, quarantine_router(tmp_path, clock, agent))
    submit_quarantined(spool, "a@example.test", "b@far.test", notify=(NOTIFY_ALL, "SUCCESS"))
    assert agent.dsns == [] and agent.calls == []  # nothing to the recipients either
    assert queued(spool) == [] and queued(spool, "dead") == []  # finished
    [record] = q.list_quarantine(str(tmp_path / "quarantine"))
    assert record["reasons"] == ["spam (score 9)"]


def test_failing_quarantine_sends_no_delay_or_failure_notice(tmp_path, clock):
    (tmp_path / "not-a-directory").write_bytes(b"")
    agent = Agent()
    router = quarantine_router(tmp_path, clock, agent, str(tmp_path / "not-a-directory"))
    spool, _ = make(tmp_path, clock, router, max_age=200.0, delay_warning=50.0)
    submit_quarantined(spool, "a@example.test", notify=(NOTIFY_ALL,))
    for _ in range(5):  # retries every 60 s, then expiry at 200 s
        clock.advance(60)
    assert agent.dsns == [] and agent.calls == []
    assert queued(spool) == [] and len(queued(spool, "dead")) == 1  # kept for the operator


def test_release_keeps_the_dsn_request_of_the_quarantined_recipients(tmp_path, clock):
    agent = Agent()
    spool, _ = make(tmp_path, clock, quarantine_router(tmp_path, clock, agent))
    submit_quarantined(spool, "a@example.test", "b@example.test", notify=("NEVER", NOTIFY_ALL))
    [record] = q.list_quarantine(str(tmp_path / "quarantine"))
    released = q.record_envelope(record)
    assert released.quarantine is None
    assert (released.dsn_ret, released.dsn_envid) == ("FULL", "ENV-7")
    assert released.dsn_notify == ("NEVER", NOTIFY_ALL)
    assert released.dsn_orcpt == ("rfc822;a@example.test", "rfc822;b@example.test")
    # Queued again (as `mta-admin quarantine release` does), it is delivered and the
    # sender gets the success notice the message would have given without quarantine.
    f = spool.open(spool.new_queue_id())
    f.write(BODY)
    f.commit(released, TRACE)
    assert agent.calls == [[Address("a", "example.test"), Address("b", "example.test")]]
    [(_, msg, _)] = agent.dsns
    _, per_message, per_rcpt, _ = report(msg)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert per_message["Original-Envelope-Id"] == "ENV-7"
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; b@example.test"]


def test_a_record_for_some_recipients_keeps_their_own_dsn_and_originals():
    env = Envelope(
        sender=SENDER,
        recipients=(addr("a@example.test"), addr("b@example.test"), addr("c@example.test")),
        original_recipients=(addr("list@example.test"),) * 2 + (addr("c@example.test"),),
        dsn_notify=("NEVER", "SUCCESS", "FAILURE"),
        dsn_orcpt=("", "rfc822;B@example.test", ""),
        quarantine="virus found: X",
    )
    pending = [addr("b@example.test"), addr("c@example.test")]  # a was done before
    released = q.record_envelope(q.envelope_record("Q1", env, pending, 0.0))
    assert released.recipients == tuple(pending)
    assert released.original_recipients == (addr("list@example.test"), addr("c@example.test"))
    assert released.dsn_notify == ("SUCCESS", "FAILURE")
    assert released.dsn_orcpt == ("rfc822;B@example.test", "")
    plain = attrs.evolve(env, dsn_notify=(), dsn_orcpt=(), original_recipients=())
    released = q.record_envelope(q.envelope_record("Q1", plain, pending, 0.0))
    assert released.dsn_notify == () and released.original_recipients == ()
