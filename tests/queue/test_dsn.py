"""DSN (RFC 3461/3464) end to end through the queue on a Clock: NOTIFY decides which
notices are written (failure, delay, success), ORCPT and ENVID appear in them, RET
decides what is returned; the relay passes the request on to servers offering DSN."""

from __future__ import annotations

import email
import email.policy

import pytest
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport

from mta.delivery.mx import Target
from mta.delivery.relay import RelayDelivery, dsn_request
from mta.delivery.smtpclient import SMTPClientProtocol, Timeouts
from mta.envelope import Address, DeliveryResult, Envelope, RecipientState, Reply
from mta.queue.bounce import Bouncer
from mta.queue.entry import QueueEntry
from mta.queue.filestore import FileQueueStore
from mta.queue.runner import QueueRunner
from tests.queue.doubles import InlinePool, ThreadClock

HEADERS = b"From: Sender <sender@remote.test>\r\nSubject: hello\r\nMessage-ID: <m1@remote.test>\r\n"
BODY = HEADERS + b"\r\nsecret body\r\n"
TRACE = b"Received: from client by mx.example.test\r\n"
SENDER = Address("sender", "remote.test")
OK = Reply(250, "2.0.0", "delivered")


def addr(s: str) -> Address:
    local, _, domain = s.rpartition("@")
    return Address(local, domain)


class Agent:
    """Fails `bad`, defers `slow`, delivers the rest (as `delivered_as` builds it).
    DSNs (listener "bounce") are parsed into `dsns` and delivered."""

    def __init__(self, bad=(), slow=(), delivered_as=None):
        self.bad, self.slow = set(bad), set(slow)
        self.delivered_as = delivered_as or (
            lambda r: DeliveryResult(r, RecipientState.DELIVERED, "stored in /var/mail/x", OK)
        )
        self.dsns = []
        self.calls = []

    def deliver(self, entry, recipients):
        if entry.envelope.listener == "bounce":
            raw = b"".join(entry.body.chunks())
            self.dsns.append(
                (entry, email.message_from_bytes(raw, policy=email.policy.compat32), raw)
            )
            return succeed([DeliveryResult.delivered(r) for r in recipients])
        self.calls.append(list(recipients))
        out = []
        for r in recipients:
            if str(r) in self.bad:
                out.append(DeliveryResult.failed(r, f"550 5.1.1 <{r}>: no such user"))
            elif str(r) in self.slow:
                out.append(DeliveryResult.deferred(r, "451 4.4.1 try later"))
            else:
                out.append(self.delivered_as(r))
        return succeed(out)


@pytest.fixture
def clock():
    return ThreadClock()


def make(tmp_path, clock, agent, *, max_age=1000.0, delay_warning=0.0, max_return=10**7):
    pool = InlinePool()
    spool = FileQueueStore(str(tmp_path / "queue"), clock, pool)
    bouncer = Bouncer(spool, "mx.example.test", clock, pool, max_return=max_return)
    runner = QueueRunner(
        spool,
        agent,
        clock,
        (60.0,),
        max_age,
        5,
        bouncer=bouncer,
        delay_warning=delay_warning,
    )
    runner.startService()
    return spool, runner


def submit(spool, *rcpts, notify=(), orcpt=(), ret=None, envid=None, sender=SENDER, originals=()):
    env = Envelope(
        sender=sender,
        recipients=tuple(addr(r) for r in rcpts),
        original_recipients=tuple(addr(r) for r in originals),
        received_at=spool.reactor.seconds(),
        dsn_ret=ret,
        dsn_envid=envid,
        dsn_notify=tuple(notify),
        dsn_orcpt=tuple(orcpt),
    )
    qid = spool.new_queue_id()
    f = spool.open(qid)
    f.write(BODY)
    f.commit(env, TRACE)
    return qid


def queued(spool, sub="active"):
    import os

    from mta.queue import entry as fmt

    d = os.path.join(spool.queue_dir, sub)
    return sorted(n for n in os.listdir(d) if fmt.is_queue_id(n))


def report(msg):
    """(text, per-message fields, [per-recipient fields], returned part)."""
    text, status, returned = msg.get_payload()
    per_message, *per_rcpt = status.get_payload()
    return text.get_payload(), per_message, per_rcpt, returned


# -- failure -----------------------------------------------------------------------


def test_notify_never_and_without_failure_silence_the_bounce(tmp_path, clock):
    agent = Agent(bad={"a@x.test", "b@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", "b@x.test", notify=("NEVER", "SUCCESS,DELAY"))
    assert agent.dsns == []
    assert queued(spool) == [] and queued(spool, "dead") == []  # left the queue


def test_only_recipients_wanting_failure_are_reported(tmp_path, clock):
    agent = Agent(bad={"a@x.test", "b@x.test", "c@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", "b@x.test", "c@x.test", notify=("NEVER", "", "FAILURE"))
    [(dsn_entry, msg, _)] = agent.dsns
    assert dsn_entry.envelope.sender.is_null
    assert dsn_entry.envelope.recipients == (SENDER,)
    text, _, per_rcpt, returned = report(msg)
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; b@x.test", "rfc822; c@x.test"]
    assert {r["Action"] for r in per_rcpt} == {"failed"}
    assert {r["Status"] for r in per_rcpt} == {"5.1.1"}
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"


def test_orcpt_and_envid_in_the_report(tmp_path, clock):
    agent = Agent(bad={"a@x.test", "b@x.test", "c@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(
        spool,
        "a@x.test",
        "b@x.test",
        "c@x.test",
        notify=("", "", ""),
        orcpt=("rfc822;Alias+1@x.test", "", ""),
        originals=("list@x.test", "list@x.test", "c@x.test"),
        envid="QQ314159 env",
    )
    [(_, msg, _)] = agent.dsns
    _, per_message, per_rcpt, _ = report(msg)
    assert per_message["Original-Envelope-Id"] == "QQ314159 env"
    assert [r["Original-Recipient"] for r in per_rcpt] == [
        "rfc822; Alias+1@x.test",  # ORCPT as given
        "rfc822; list@x.test",  # else the RCPT TO it came from
        "rfc822; c@x.test",
    ]


def test_no_envid_no_original_envelope_id(tmp_path, clock):
    agent = Agent(bad={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test")
    [(_, msg, _)] = agent.dsns
    _, per_message, per_rcpt, returned = report(msg)
    assert per_message["Original-Envelope-Id"] is None
    assert per_rcpt[0]["Original-Recipient"] is None
    assert returned.get_content_type() == "text/rfc822-headers"  # default RET: headers


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_ret_hdrs_returns_headers_only(tmp_path, clock, ret):
    agent = Agent(bad={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", ret=ret)
    [(_, msg, _)] = agent.dsns
    *_, returned = report(msg)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in returned.get_payload()
    assert "secret body" not in returned.get_payload()


def test_ret_full_returns_the_whole_message(tmp_path, clock):
    agent = Agent(bad={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", ret="FULL")
    [(_, msg, raw)] = agent.dsns
    text, _, _, returned = report(msg)
    assert returned.get_content_type() == "message/rfc822"
    [original] = returned.get_payload()
    assert original["Subject"] == "hello"
    assert original["Received"] == "from client by mx.example.test"
    assert original.get_payload() == "secret body\r\n"
    assert TRACE + BODY in raw
    assert "It is attached below." in text


def test_ret_full_above_the_limit_falls_back_to_headers(tmp_path, clock):
    agent = Agent(bad={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent, max_return=50)
    submit(spool, "a@x.test", ret="FULL")
    [(_, msg, _)] = agent.dsns
    text, _, _, returned = report(msg)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "secret body" not in returned.get_payload()
    assert "too large" in text and str(len(TRACE + BODY)) in text


def test_null_sender_gets_no_dsn_of_any_kind(tmp_path, clock):
    agent = Agent(bad={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent, delay_warning=60.0)
    null = Address("", "")
    submit(spool, "a@x.test", "b@x.test", notify=("FAILURE", "SUCCESS"), sender=null)
    assert agent.dsns == []
    assert len(queued(spool, "dead")) == 1  # as before: null-sender failures are kept


# -- delay -------------------------------------------------------------------------


def test_one_delay_notice_when_notify_delay_after_delay_warning(tmp_path, clock):
    agent = Agent(slow={"a@x.test", "b@x.test"})
    spool, _ = make(tmp_path, clock, agent, max_age=1000.0, delay_warning=100.0)
    submit(spool, "a@x.test", "b@x.test", notify=("DELAY,FAILURE", ""))
    clock.advance(60)  # second attempt, age 60: too early
    assert agent.dsns == []
    clock.advance(60)  # third attempt, age 120
    [(_, msg, _)] = agent.dsns
    text, _, per_rcpt, returned = report(msg)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; a@x.test"]  # b: no DELAY
    assert per_rcpt[0]["Action"] == "delayed"
    assert per_rcpt[0]["Status"] == "4.4.1"
    assert per_rcpt[0]["Will-Retry-Until"] == "Thu, 01 Jan 1970 00:16:40 +0000"
    assert "Remote-MTA" not in per_rcpt[0]  # the agent's own words: no server said it
    assert per_rcpt[0]["Diagnostic-Code"] == "X-mta; 451 4.4.1 try later"
    assert returned.get_content_type() == "text/rfc822-headers"
    clock.advance(60)
    clock.advance(60)
    assert len(agent.dsns) == 1  # at most one per entry
    assert len(agent.calls) == 5


def test_no_delay_notice_for_a_null_sender(tmp_path, clock):
    agent = Agent(slow={"a@x.test"})
    spool, _ = make(tmp_path, clock, agent, delay_warning=60.0)
    submit(spool, "a@x.test", notify=("DELAY",), sender=Address("", ""))
    for _ in range(4):
        clock.advance(60)
    assert len(agent.calls) == 5 and agent.dsns == []


def test_no_delay_notice_by_default_or_when_off(tmp_path, clock):
    agent = Agent(slow={"a@x.test", "b@x.test"})
    spool, _ = make(tmp_path, clock, agent, delay_warning=0.0)
    submit(spool, "a@x.test", notify=("DELAY",))
    spool2, _ = make(tmp_path / "2", clock, agent, delay_warning=10.0)
    submit(spool2, "b@x.test")  # no NOTIFY: failures only
    for _ in range(5):
        clock.advance(60)
    assert agent.dsns == []


# -- success -----------------------------------------------------------------------


def test_success_notice_after_local_delivery(tmp_path, clock):
    agent = Agent(slow={"c@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(
        spool,
        "a@x.test",
        "b@x.test",
        "c@x.test",
        notify=("SUCCESS", "FAILURE", "SUCCESS"),
        envid="E1",
    )
    [(_, msg, _)] = agent.dsns  # sent right after the attempt, c still deferred
    text, per_message, per_rcpt, returned = report(msg)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    assert [r["Final-Recipient"] for r in per_rcpt] == ["rfc822; a@x.test"]
    assert per_rcpt[0]["Action"] == "delivered"
    assert per_rcpt[0]["Status"] == "2.0.0"
    assert per_message["Original-Envelope-Id"] == "E1"
    assert "/var/mail" not in msg.as_string()  # mailbox paths stay private
    assert returned.get_content_type() == "text/rfc822-headers"


def test_no_success_notice_without_notify_success(tmp_path, clock):
    agent = Agent()
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", "b@x.test", notify=("FAILURE", ""))
    assert agent.dsns == []
    assert queued(spool) == []


def test_success_and_failure_in_one_report_with_ret_full(tmp_path, clock):
    agent = Agent(bad={"b@x.test"})
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", "b@x.test", notify=("SUCCESS", ""), ret="FULL")
    [(_, msg, _)] = agent.dsns
    _, _, per_rcpt, returned = report(msg)
    assert [(r["Final-Recipient"], r["Action"]) for r in per_rcpt] == [
        ("rfc822; a@x.test", "delivered"),
        ("rfc822; b@x.test", "failed"),
    ]
    assert returned.get_content_type() == "message/rfc822"
    assert queued(spool) == []


def test_relayed_to_server_without_dsn_reports_relayed(tmp_path, clock):
    agent = Agent(
        delivered_as=lambda r: DeliveryResult(
            r, RecipientState.DELIVERED, "mx.x.test[192.0.2.1] said: 250 2.0.0 ok", OK, False
        )
    )
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", notify=("SUCCESS,FAILURE",))
    [(_, msg, _)] = agent.dsns
    _, _, per_rcpt, _ = report(msg)
    assert per_rcpt[0]["Action"] == "relayed"
    assert per_rcpt[0]["Status"] == "2.0.0"
    assert "Remote-MTA" not in per_rcpt[0]  # the result names no server


def test_relayed_report_names_the_server_that_took_it(tmp_path, clock):
    agent = Agent(
        delivered_as=lambda r: DeliveryResult(
            r,
            RecipientState.DELIVERED,
            "mx.x.test[192.0.2.1]:25 said: 250 2.0.0 ok",
            Reply(250, "2.0.0", "ok"),
            False,
            "mx.x.test",
        )
    )
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", notify=("SUCCESS",))
    [(_, msg, _)] = agent.dsns
    _, _, per_rcpt, _ = report(msg)
    assert per_rcpt[0]["Action"] == "relayed"
    assert per_rcpt[0]["Remote-MTA"] == "dns; mx.x.test"
    assert "Diagnostic-Code" not in per_rcpt[0]


def test_relayed_to_server_with_dsn_leaves_success_to_it(tmp_path, clock):
    agent = Agent(
        delivered_as=lambda r: DeliveryResult(r, RecipientState.DELIVERED, "250 2.0.0 ok", OK, True)
    )
    spool, _ = make(tmp_path, clock, agent)
    submit(spool, "a@x.test", notify=("SUCCESS",))
    assert agent.dsns == []
    assert queued(spool) == []


# -- the relay passes the request on ---------------------------------------------------


class StubMX:
    def __init__(self):
        self.target = Target("mx.x.test", "192.0.2.1", 25, 10)

    def resolve(self, domain):
        return succeed([self.target])

    def is_unreachable(self, target):
        return False

    def mark_reachable(self, target):
        pass

    def mark_unreachable(self, target):
        pass


def relay_entry(tmp_path, notify, orcpt):
    path = tmp_path / "0123abcd"
    path.write_bytes(BODY + b"METADATA")
    env = Envelope(
        SENDER,
        (addr("a@x.test"), addr("b@x.test")),
        dsn_ret="FULL",
        dsn_envid="E 1",
        dsn_notify=notify,
        dsn_orcpt=orcpt,
    )
    return QueueEntry("0123abcd", env, str(path), len(BODY))


@pytest.mark.parametrize("offers_dsn", [True, False])
def test_relay_passes_the_request_only_to_a_dsn_server(tmp_path, offers_dsn):
    clock = ThreadClock()
    transport = StringTransport()
    proto = SMTPClientProtocol(clock, Timeouts(), peer="mx.x.test[192.0.2.1]")
    proto.makeConnection(transport)
    relay = RelayDelivery(
        StubMX(), clock, helo="mx.example.test", tls="none", connect=lambda t: succeed(proto)
    )
    entry = relay_entry(tmp_path, ("SUCCESS", ""), ("", "rfc822;b@x.test"))
    d = relay.deliver(entry.job(), list(entry.envelope.recipients))
    proto.dataReceived(b"220 hi\r\n")
    assert transport.value() == b"EHLO mx.example.test\r\n"
    transport.clear()
    ext = b"250-DSN\r\n" if offers_dsn else b""
    proto.dataReceived(b"250-mx.x.test\r\n" + ext + b"250 PIPELINING\r\n")
    sent = transport.value()
    transport.clear()
    if offers_dsn:
        assert sent == (
            b"MAIL FROM:<sender@remote.test> RET=FULL ENVID=E+201\r\n"
            b"RCPT TO:<a@x.test> NOTIFY=SUCCESS\r\n"
            b"RCPT TO:<b@x.test> ORCPT=rfc822;b@x.test\r\nDATA\r\n"
        )
    else:
        assert sent == (
            b"MAIL FROM:<sender@remote.test>\r\n"
            b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
        )
    proto.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    proto.dataReceived(b"250 2.0.0 queued\r\n")
    results = d.result
    assert {r.state for r in results} == {RecipientState.DELIVERED}
    assert {r.dsn_passed for r in results} == {offers_dsn}
    assert transport.value().endswith(b"QUIT\r\n")  # the relay is not running: no reuse
    proto.dataReceived(b"221 bye\r\n")


def test_dsn_request_for_a_subset_of_recipients():
    env = Envelope(
        SENDER,
        (addr("a@x.test"), addr("b@y.test"), addr("c@x.test")),
        dsn_notify=("SUCCESS", "NEVER", ""),
        dsn_orcpt=("", "", "rfc822;c@x.test"),
    )
    fields = dsn_request(env, [addr("a@x.test"), addr("c@x.test")])
    assert fields["dsn_notify"] == ("SUCCESS", "")
    assert fields["dsn_orcpt"] == ("", "rfc822;c@x.test")
    assert "dsn_notify" not in dsn_request(
        Envelope(SENDER, (addr("a@x.test"),)), [addr("a@x.test")]
    )
