"""Bounces: RFC 3464 DSNs queued through the spool on a Clock; null sender -> dead letter."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re

import pytest
from twisted.internet.defer import succeed

from mta.envelope import Address, DeliveryResult, Envelope, RecipientState, Reply
from mta.queue import entry as fmt
from mta.queue.bounce import Bouncer
from mta.queue.dsn import FailedRecipient, build_dsn, diagnosis, failure_reports, status_code
from mta.queue.filestore import FileQueueStore
from mta.queue.runner import QueueRunner
from tests.queue.doubles import InlinePool, ThreadClock, envelope

BODY = b"From: Sender <sender@remote.test>\r\nSubject: hello\r\nMessage-ID: <m1@remote.test>\r\n\r\nsecret body\r\n"


MX = "mx.example.test[192.0.2.1]:25"


class Agent:
    """Fails `bad` recipients with 550, defers `slow` ones, delivers the rest; the
    replies come from a remote server, written as the relay writes them; `local`
    recipients fail with a refusal of our own (SMTPUTF8 not offered)."""

    def __init__(self, bad=(), slow=(), local=()):
        self.bad, self.slow, self.local = set(bad), set(slow), set(local)
        self.calls = []

    def deliver(self, entry, recipients):
        self.calls.append((entry.qid, entry.envelope.sender, list(recipients)))
        out = []
        for r in recipients:
            if str(r) in self.bad:
                reply = Reply(550, "5.1.1", f"<{r}>: no such user")
                out.append(
                    DeliveryResult(
                        r,
                        RecipientState.FAILED,
                        f"{MX} said: {reply}",
                        reply,
                        None,
                        "mx.example.test",
                    )
                )
            elif str(r) in self.slow:
                reply = Reply(451, "4.4.1", "try later")
                out.append(
                    DeliveryResult(
                        r,
                        RecipientState.DEFERRED,
                        f"{MX} said: {reply}",
                        reply,
                        None,
                        "mx.example.test",
                    )
                )
            elif str(r) in self.local:
                out.append(
                    DeliveryResult.failed(
                        r, f"553 5.6.7 SMTPUTF8 is required, but was not offered by {MX[:-3]}"
                    )
                )
            else:
                out.append(DeliveryResult.delivered(r))
        return succeed(out)


@pytest.fixture
def clock():
    return ThreadClock()


def make(tmp_path, clock, agent, max_age=1000.0):
    pool = InlinePool()
    spool = FileQueueStore(str(tmp_path / "queue"), clock, pool)
    bouncer = Bouncer(spool, "mx.example.test", clock, pool)
    runner = QueueRunner(spool, agent, clock, (10.0, 20.0), max_age, 5, bouncer=bouncer)
    runner.startService()
    return spool, runner


def submit(spool, env):
    qid = spool.new_queue_id()
    f = spool.open(qid)
    f.write(BODY)
    f.commit(env, b"Received: from client by mx.example.test\r\n")
    return qid


def queued(spool, sub="active"):
    d = os.path.join(spool.queue_dir, sub)
    return sorted(n for n in os.listdir(d) if fmt.is_queue_id(n))


def load(spool, qid):
    e = fmt.read_entry(os.path.join(spool.spool.active_dir, qid))
    with open(e.path, "rb") as f:
        body = f.read(e.body_length)
    return e, email.message_from_bytes(body, policy=email.policy.compat32)


def test_permanent_failure_queues_one_dsn_with_rfc3464_structure(tmp_path, clock):
    # The DSN recipient is deferred so the bounce stays in the queue to inspect.
    agent = Agent(bad={"bob@example.test", "carol@example.test"}, slow={"sender@remote.test"})
    spool, runner = make(tmp_path, clock, agent)
    env = Envelope(
        sender=Address("sender", "remote.test"),
        recipients=(
            Address("bob", "example.test"),
            Address("carol", "example.test"),
            Address("dave", "example.test"),
        ),
        original_recipients=(
            Address("info", "example.test"),
            Address("carol", "example.test"),
            Address("dave", "example.test"),
        ),
        received_at=0.0,
    )
    qid = submit(spool, env)
    bounces = [c for c in agent.calls if c[1].is_null]
    assert len(bounces) == 1, agent.calls
    bounce_qid = bounces[0][0]
    assert queued(spool) == [bounce_qid]  # the original is gone, the DSN waits
    assert queued(spool, "dead") == []
    entry, msg = load(spool, bounce_qid)
    assert entry.envelope.sender.is_null
    assert entry.envelope.recipients == (Address("sender", "remote.test"),)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "sender@remote.test"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "no such user" in text.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.example.test"
    assert per_message["X-Queue-ID"] == qid
    assert per_message["Arrival-Date"]
    assert [r["Final-Recipient"] for r in per_rcpt] == [
        "rfc822; bob@example.test",
        "rfc822; carol@example.test",
    ]
    assert [r["Original-Recipient"] for r in per_rcpt] == [
        "rfc822; info@example.test",
        "rfc822; carol@example.test",
    ]
    assert {r["Action"] for r in per_rcpt} == {"failed"}
    assert {r["Status"] for r in per_rcpt} == {"5.1.1"}
    # RFC 3464 2.3.5/2.3.6: the server's name, and its reply alone after "smtp;".
    assert per_rcpt[0]["Remote-MTA"] == "dns; mx.example.test"
    assert per_rcpt[0]["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.test>: no such user"
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload()
    assert "Subject: hello" in original and "Received: from client" in original
    assert "secret body" not in original


def test_expiry_at_max_age_bounces_with_5_4_7(tmp_path, clock):
    agent = Agent(slow={"bob@example.test", "sender@remote.test"})
    spool, runner = make(tmp_path, clock, agent, max_age=25.0)
    qid = submit(spool, envelope("bob@example.test"))
    clock.advance(10)  # second attempt, deferred again; next would be at 30 > max_age
    assert not [c for c in agent.calls if c[1].is_null]
    clock.advance(15)  # at max_age: last attempt, then expiry
    bounces = [c for c in agent.calls if c[1].is_null]
    assert len(bounces) == 1
    assert qid not in queued(spool)
    _, msg = load(spool, bounces[0][0])
    (rcpt,) = msg.get_payload()[1].get_payload()[1:]
    assert rcpt["Status"] == "5.4.7"
    # The last thing the server said, as it said it; "expired" is in the text part.
    assert rcpt["Remote-MTA"] == "dns; mx.example.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.4.1 try later"
    assert "expired" in msg.get_payload()[0].get_payload()


def test_null_sender_is_never_bounced_but_dead_lettered(tmp_path, clock):
    agent = Agent(bad={"bob@example.test"})
    spool, runner = make(tmp_path, clock, agent)
    qid = submit(spool, envelope("bob@example.test", sender=""))
    assert [c[0] for c in agent.calls] == [qid]
    assert queued(spool) == []
    assert queued(spool, "dead") == [qid]
    status = fmt.read_status(os.path.join(spool.spool.dead_dir, qid + fmt.STATUS_SUFFIX))
    assert "no such user" in status["reason"]


def test_undeliverable_bounce_goes_to_dead_letters(tmp_path, clock):
    agent = Agent(bad={"bob@example.test", "sender@remote.test"})
    spool, runner = make(tmp_path, clock, agent)
    submit(spool, envelope("bob@example.test"))
    (bounce,) = [c for c in agent.calls if c[1].is_null]
    assert queued(spool) == []
    assert queued(spool, "dead") == [bounce[0]]
    assert len(agent.calls) == 2  # no bounce of the bounce


def test_bounce_that_cannot_be_queued_dead_letters_the_original(tmp_path, clock):
    agent = Agent(bad={"bob@example.test"})
    spool, runner = make(tmp_path, clock, agent)

    async def broken(entry, reports):
        raise OSError(28, "No space left on device")

    runner.bouncer.notify = broken
    qid = submit(spool, envelope("bob@example.test"))
    assert queued(spool, "dead") == [qid]


def test_status_code_prefers_permanent_codes():
    assert status_code("550 5.1.1 no such user") == "5.1.1"
    assert status_code("5.4.7 delivery time expired: 451 4.4.1 try later") == "5.4.7"
    assert status_code("554 transaction failed") == "5.0.0"
    assert status_code("connection to 192.0.2.1 refused") == "5.0.0"


def test_build_dsn_utf8_recipient_crlf_only():
    message = build_dsn(
        hostname="mx.example.test",
        qid="q1",
        sender=Address("sender", "remote.test"),
        arrival=0.0,
        now=60.0,
        recipients=[FailedRecipient(Address("jörg", "example.test"), None, "5.1.1", "550 no")],
        original_headers=b"Subject: x\n",
        boundary="b/1",
        message_id="q2.dsn@mx.example.test",
    )
    assert b"\n" not in message.replace(b"\r\n", b"")  # no bare LF
    msg = email.message_from_bytes(message, policy=email.policy.compat32)
    rcpt = msg.get_payload()[1].get_payload()[1]
    assert str(rcpt["Final-Recipient"]).startswith("utf-8; ")
    assert "Original-Recipient" not in rcpt
    assert msg.get_payload()[2].get_payload() == "Subject: x\r\n"


def test_our_own_refusal_is_not_reported_as_the_servers(tmp_path, clock):
    agent = Agent(local={"bob@example.test"}, slow={"sender@remote.test"})
    spool, runner = make(tmp_path, clock, agent)
    submit(spool, envelope("bob@example.test"))
    (bounce,) = [c for c in agent.calls if c[1].is_null]
    _, msg = load(spool, bounce[0])
    (rcpt,) = msg.get_payload()[1].get_payload()[1:]
    assert rcpt["Status"] == "5.6.7"
    assert "Remote-MTA" not in rcpt
    assert rcpt["Diagnostic-Code"] == (
        "X-mta; 553 5.6.7 SMTPUTF8 is required, but was not offered by mx.example.test[192.0.2.1]"
    )


def test_a_status_record_written_before_remote_mta_existed_still_reports_it(tmp_path):
    """The status file format is unchanged: an old record (its details as the relay
    wrote them then) loads, and its bounce names the server and quotes its reply."""
    path = tmp_path / "0123abcd"
    body = b"Subject: x\r\n\r\nhi\r\n"
    env = envelope("bob@example.test", "carol@example.test")
    meta = fmt.encode_metadata("0123abcd", env, b"", len(body), 0.0)
    path.write_bytes(body + fmt.encode_trailer(meta, len(body)))
    old = {
        "version": 1,
        "attempts": 2,
        "next_attempt": 0.0,
        "last_error": "",
        "states": ["failed", "failed"],
        "details": [
            "mx.peer.test[127.0.0.1]:26125 said: 550 5.1.1 <bob@example.test>: unknown",
            "dest.test: 451 4.4.1 connect to mx.peer.test[127.0.0.1]:25 failed: Refused",
        ],
    }
    (tmp_path / ("0123abcd" + fmt.STATUS_SUFFIX)).write_text(json.dumps(old) + "\n")
    entry = fmt.read_entry(str(path))
    bob, carol = failure_reports(entry)
    assert (bob.remote_mta, bob.reply) == (
        "mx.peer.test",
        "550 5.1.1 <bob@example.test>: unknown",
    )
    assert (carol.remote_mta, carol.reply) == (None, None)


def test_diagnosis_finds_what_a_server_said():
    def said(detail):
        found = diagnosis(detail)
        return found.remote_mta, found.reply

    assert said("mx.a.test[192.0.2.1]:25 said: 550 5.1.1 no") == ("mx.a.test", "550 5.1.1 no")
    assert said("[192.0.2.7]:2525 said: 554 5.7.1 go away\nfar") == (
        "192.0.2.7",
        "554 5.7.1 go away far",
    )
    assert said("mx6.a.test[2001:db8::1]:25 said: 421 4.3.2 bye") == (
        "mx6.a.test",
        "421 4.3.2 bye",
    )
    expired = "5.4.7 delivery time expired after 3 attempt(s): mx.a.test[192.0.2.1]:25 said: 451 4.3.0 later"
    assert said(expired) == ("mx.a.test", "451 4.3.0 later")
    for ours in (
        "550 5.1.2 domain nowhere.test not found (MX: NXDOMAIN)",
        "a.test: 451 4.4.1 connect to mx.a.test[192.0.2.1]:25 failed: ConnectionRefusedError",
        "553 5.6.7 SMTPUTF8 is required, but was not offered by mx.a.test[192.0.2.1]",
        "451 4.4.2 timeout waiting for mx.a.test[192.0.2.1]",
        "",
    ):
        assert said(ours) == (None, None), ours


DATE = re.compile(r"^[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} \+0000$")


def test_dsn_fields_in_rfc3464_order_with_utc_dates_written_plus_0000():
    message = build_dsn(
        hostname="mx.example.test",
        qid="q1",
        sender=Address("sender", "remote.test"),
        arrival=0.0,
        now=60.0,
        recipients=[
            FailedRecipient(
                Address("bob", "example.test"),
                Address("info", "example.test"),
                "5.1.1",
                "mx.a.test[192.0.2.1]:25 said: 550 5.1.1 n\u00f6 such user",
                remote_mta="mx.a.test",
                reply="550 5.1.1 n\u00f6 such user\x07",
            )
        ],
        original_headers=b"Subject: x\r\n",
        boundary="b/1",
        message_id="q2.dsn@mx.example.test",
    )
    msg = email.message_from_bytes(message, policy=email.policy.compat32)
    assert DATE.match(msg["Date"]), msg["Date"]  # -0000 would mean "local time unknown"
    per_message, rcpt = msg.get_payload()[1].get_payload()
    assert DATE.match(per_message["Arrival-Date"])
    assert DATE.match(rcpt["Last-Attempt-Date"])
    assert rcpt.keys() == [
        "Original-Recipient",
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]
    # The delivery-status part is 7-bit: what the server sent is made safe.
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 n? such user?"
