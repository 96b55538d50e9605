"""The session and the policy pipeline: one call per phase, replies strictly in order,
end-of-message checks before the 250."""

from __future__ import annotations

import os

from mta.envelope import Reply
from mta.policy.verdict import Phase, Verdict
from mta.testing import FakeMessageBody, FakePolicyCheck, FakeSpool
from tests.smtp.helpers import make_harness

TX = "MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
BODY = "Subject: policy\r\n\r\nline one\r\n..dotted\r\n.\r\n"
NO = Reply(550, "5.7.1", "Message content rejected")


def test_pipelined_commands_wait_for_a_pending_mail_check_and_answer_in_order():
    slow = FakePolicyCheck("slow", [Phase.MAIL], hold=True)
    h = make_harness(checks=[slow])
    h.ehlo()
    h.send(TX + BODY + "NOOP\r\n")
    assert h.replies() == [], "nothing may be answered before the MAIL check"
    assert len(slow.calls) == 1
    assert h.spool.opened == [], "DATA must not have been looked at"
    slow.release()
    assert h.replies() == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q000001",
        "250 2.0.0 Ok",
    ]
    assert h.spool.committed[0].body == b"Subject: policy\r\n\r\nline one\r\n.dotted\r\n"


def test_pipelined_rcpts_each_wait_for_their_own_check():
    slow = FakePolicyCheck("slow", [Phase.RCPT], hold=True)
    h = make_harness(checks=[slow])
    h.ehlo()
    h.send(
        "MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        "RCPT TO:<team@example.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert h.replies() == ["250 2.1.0 Ok"]
    slow.release()
    assert h.replies() == ["250 2.1.5 Ok"]
    assert len(slow.calls) == 2
    rcpt, context = slow.calls[1]
    assert str(context.recipient) == "team@example.test"
    assert [str(r) for r in context.recipients] == ["alice@example.test"]
    slow.release(Verdict.tempfail(Reply(451, "4.7.1", "Greylisted")))
    assert h.replies() == [
        "451 4.7.1 Greylisted",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q000001",
    ]
    assert [str(r) for r in h.spool.committed[0].envelope.recipients] == ["alice@example.test"]


def test_end_of_message_check_sees_the_whole_body_and_its_header_is_committed():
    tag = FakePolicyCheck(
        "spam", verdicts={Phase.DATA: Verdict.accept(headers=(b"X-Spam-Score: 0.1\r\n",))}
    )
    h = make_harness(checks=[tag])
    h.ehlo()
    h.send(TX + BODY)
    assert h.codes() == ["250", "250", "354", "250"]
    assert tag.bodies == [b"Subject: policy\r\n\r\nline one\r\n.dotted\r\n"]
    phase, context = tag.calls[0]
    assert (phase, context.queue_id, context.size) == (Phase.DATA, "Q000001", 38)
    assert context.body.header_block() == b"Subject: policy\r\n"
    [msg] = h.spool.committed
    assert msg.trace_headers.startswith(b"X-Spam-Score: 0.1\r\nReceived: from client.example")


def test_a_slow_end_of_message_check_holds_the_250_and_later_commands():
    slow = FakePolicyCheck("clamd", [Phase.DATA], hold=True)
    h = make_harness(checks=[slow])
    h.ehlo()
    h.send(TX + BODY + "NOOP\r\n")
    assert h.codes() == ["250", "250", "354"]
    assert h.spool.committed == []
    slow.release()
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"]


def test_a_reject_at_end_of_data_answers_its_code_and_commits_nothing():
    h = make_harness(checks=[FakePolicyCheck("av", verdicts={Phase.DATA: Verdict.reject(NO)})])
    h.ehlo()
    h.send(TX + BODY + "NOOP\r\n")
    assert h.replies()[-2:] == ["550 5.7.1 Message content rejected", "250 2.0.0 Ok"]
    assert h.spool.committed == []
    assert h.spool.aborted == ["Q000001"]
    h.send(TX + BODY)  # the session is ready for the next message
    assert h.replies()[-1] == "550 5.7.1 Message content rejected"


def test_a_reject_at_the_end_of_bdat_commits_nothing():
    h = make_harness(checks=[FakePolicyCheck("av", verdicts={Phase.DATA: Verdict.reject(NO)})])
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nBDAT 5 LAST\r\nabc\r\n")
    assert h.codes() == ["250", "250", "550"]
    assert h.spool.committed == [] and h.spool.aborted == ["Q000001"]


def test_a_timed_out_end_of_message_check_is_a_451_and_nothing_is_committed():
    hung = FakePolicyCheck("spamd", [Phase.DATA], hold=True)
    h = make_harness(checks=[hung], pipeline_options={"timeout": 30.0})
    h.ehlo()
    h.send(TX + BODY)
    h.replies()
    h.clock.advance(30)
    assert h.replies() == ["451 4.4.3 Error: a policy check timed out, try again later"]
    assert h.spool.committed == [] and h.spool.aborted == ["Q000001"]
    hung.release()
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_a_broken_check_is_a_451_and_the_session_continues():
    broken = FakePolicyCheck("broken", [Phase.MAIL], error=RuntimeError("bug"))
    h = make_harness(checks=[broken])
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nNOOP\r\n")
    assert h.replies() == ["451 4.3.0 Error: internal error, try again later", "250 2.0.0 Ok"]


def test_discard_answers_250_and_keeps_nothing():
    h = make_harness(
        checks=[FakePolicyCheck("bh", verdicts={Phase.DATA: Verdict.discard("blackholed")})]
    )
    h.ehlo()
    h.send(TX + BODY)
    assert h.replies()[-1] == "250 2.0.0 Ok: queued as Q000001"
    assert h.spool.committed == [] and h.spool.aborted == ["Q000001"]


def test_discard_at_rcpt_skips_the_end_of_message_checks():
    data_check = FakePolicyCheck("after", [Phase.DATA])
    h = make_harness(
        checks=[
            FakePolicyCheck("bh", verdicts={Phase.RCPT: Verdict.discard("trap address")}),
            data_check,
        ]
    )
    h.ehlo()
    h.send(TX + BODY)
    assert h.codes() == ["250", "250", "354", "250"]
    assert h.spool.committed == [] and data_check.calls == []


def test_quarantine_travels_with_the_envelope_with_earlier_headers():
    h = make_harness(
        checks=[
            FakePolicyCheck("tag", verdicts={Phase.MAIL: Verdict.accept(headers=(b"X-Mail: 1",))}),
            FakePolicyCheck("spam", verdicts={Phase.DATA: Verdict.quarantine("score 12.0")}),
        ]
    )
    h.ehlo()
    h.send(TX + BODY)
    [msg] = h.spool.committed
    assert msg.envelope.quarantine == "score 12.0"
    assert msg.trace_headers.startswith(b"X-Mail: 1\r\nReceived: ")
    h.send(TX + BODY)
    assert h.spool.committed[1].envelope.quarantine == "score 12.0"
    assert h.spool.committed[1].trace_headers.startswith(b"X-Mail: 1\r\n")


def test_headers_from_connect_and_helo_go_on_every_message_of_the_session():
    h = make_harness(
        checks=[
            FakePolicyCheck("c", verdicts={Phase.CONNECT: Verdict.continue_(headers=(b"X-C: 1",))}),
            FakePolicyCheck("q", verdicts={Phase.HELO: Verdict.quarantine("odd helo")}),
        ]
    )
    h.ehlo()
    h.send(TX + BODY + TX + BODY)
    first, second = h.spool.committed
    for msg in (first, second):
        assert msg.trace_headers.startswith(b"X-C: 1\r\nReceived: ")
        assert msg.envelope.quarantine == "odd helo"


def test_no_data_check_means_no_body_is_read_and_no_quarantine():
    h = make_harness()
    h.ehlo()
    h.send(TX + BODY)
    assert h.spool.committed[0].envelope.quarantine is None


def test_connect_check_refusal_closes_with_its_reply():
    block = Verdict.reject(Reply(554, "5.7.1", "Blocked, see https://dnsbl.example"))
    h = make_harness(checks=[FakePolicyCheck("dnsbl", verdicts={Phase.CONNECT: block})])
    assert h.replies() == ["554 5.7.1 Blocked, see https://dnsbl.example"]
    assert h.transport.disconnecting


def test_a_slow_connect_check_delays_the_greeting_and_early_input_waits():
    slow = FakePolicyCheck("dnsbl", [Phase.CONNECT], hold=True)
    h = make_harness(checks=[slow])
    assert h.replies() == []
    h.send("EHLO early.example\r\n")
    assert h.replies() == []
    _, context = slow.calls[0]
    assert (context.client_address, context.listener) == ("192.0.2.10", "smtp")
    slow.release()
    lines = h.replies()
    assert lines[0] == "220 mx.example.test ESMTP mta"
    assert lines[1] == "250-mx.example.test Hello early.example"


def test_helo_check_refusal_leaves_the_client_without_a_helo():
    bad = Verdict.reject(Reply(550, "5.7.1", "HELO name is our own"))
    helo = FakePolicyCheck("helo", verdicts={Phase.HELO: bad})
    h = make_harness(checks=[helo])
    h.replies()
    h.send("EHLO mx.example.test\r\nMAIL FROM:<a@remote.test>\r\n")
    assert h.replies() == [
        "550 5.7.1 HELO name is our own",
        "503 5.5.1 Error: send HELO/EHLO first",
    ]
    assert helo.calls[0][1].helo == "mx.example.test" and helo.calls[0][1].esmtp


def test_mail_context_has_the_sender_and_declared_size():
    seen = FakePolicyCheck("seen", [Phase.MAIL])
    h = make_harness(checks=[seen])
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test> SIZE=1234 BODY=8BITMIME\r\n")
    _, context = seen.calls[0]
    assert str(context.sender) == "a@remote.test" and context.size == 1234
    assert context.helo == "client.example" and context.body_type.value == "8BITMIME"


def test_connection_lost_during_an_end_of_message_check_commits_nothing():
    slow = FakePolicyCheck("clamd", [Phase.DATA], hold=True)
    h = make_harness(checks=[slow])
    h.ehlo()
    h.send(TX + BODY)
    h.session.connectionLost(None)
    assert h.spool.aborted == ["Q000001"]
    slow.release()
    assert h.spool.committed == []


def test_an_end_of_message_check_runs_before_a_held_commit():
    tag = FakePolicyCheck("tag", [Phase.DATA])
    spool = FakeSpool(hold=True)
    h = make_harness(spool=spool, checks=[tag])
    h.ehlo()
    h.send(TX + BODY)
    assert len(tag.calls) == 1 and spool.committed == []
    spool.release()
    assert h.replies()[-1] == "250 2.0.0 Ok: queued as Q000001"


def test_fake_message_body(tmp_path):
    body = FakeMessageBody(b"A: 1\r\nB: 2\r\n\r\nbody\r\n")
    assert body.size == 20
    assert body.header_block() == b"A: 1\r\nB: 2\r\n"
    assert body.header_block(8) == b"A: 1\r\n"
    assert b"".join(body.chunks(3)) == body.data
    path = tmp_path / "copy"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        assert body.copy_into(fd) == 20
    finally:
        os.close(fd)
    assert path.read_bytes() == body.data
