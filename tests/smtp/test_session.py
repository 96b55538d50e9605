"""Protocol tests for the ESMTP session: StringTransport + Clock, no sockets."""

from __future__ import annotations

import errno

import pytest

from mta.config import ListenerConfig
from mta.smtp.server import ConnectionTracker
from mta.testing import FakeDirectory, FakeSpool
from tests.smtp.helpers import make_harness

TX = "MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"


def test_greeting_and_ehlo_extensions():
    h = make_harness(tls=object())
    assert h.replies() == ["220 mx.example.test ESMTP mta"]
    h.send("EHLO client.example\r\n")
    lines = h.replies()
    assert lines[0] == "250-mx.example.test Hello client.example"
    keywords = [line[4:] for line in lines[1:]]
    for ext in (
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ):
        assert ext in keywords
    assert lines[-1].startswith("250 ")
    assert not any(k.startswith("AUTH") for k in keywords), "AUTH must not be offered before TLS"


def test_no_starttls_advertised_without_certificate():
    h = make_harness()
    h.replies()
    h.send("EHLO c\r\n")
    assert "250-STARTTLS" not in h.replies()


def test_simple_transaction_is_stored_byte_exact():
    h = make_harness()
    h.ehlo()
    body = b"Subject: hi\r\n\r\nline one\r\n..leading dot\r\n.\r\n"
    h.send(TX)
    assert h.replies() == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    h.send(body)
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001"]
    [msg] = h.spool.committed
    assert msg.body == b"Subject: hi\r\n\r\nline one\r\n.leading dot\r\n"
    assert str(msg.envelope.sender) == "sender@remote.test"
    assert [str(r) for r in msg.envelope.recipients] == ["alice@example.test"]
    assert msg.trace_headers.startswith(
        b"Received: from client.example ([192.0.2.10])\r\n\tby mx.example.test (mta) with ESMTP id Q000001\r\n\tfor <alice@example.test>; "
    )
    assert msg.trace_headers.endswith(b"\r\n")


def test_empty_message_and_dot_on_first_line():
    h = make_harness()
    h.ehlo()
    h.send(TX + ".\r\n")
    h.replies()
    h.send(TX + "..x\r\n.\r\n")
    assert h.replies()[-1].startswith("250 2.0.0")
    assert [m.body for m in h.spool.committed] == [b"", b".x\r\n"]


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7])
def test_data_split_anywhere_gives_the_same_message(step):
    h = make_harness()
    h.ehlo()
    body = b"A: b\r\n\r\n..\r\n...\r\n...x\r\nend\r\n.\r\nNOOP\r\n"
    h.send(TX)
    h.replies()
    for i in range(0, len(body), step):
        h.send(body[i : i + step])
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"]
    assert h.spool.committed[0].body == b"A: b\r\n\r\n.\r\n..\r\n..x\r\nend\r\n"


def test_pipelined_commands_wait_for_a_slow_recipient_check():
    directory = FakeDirectory({"alice@example.test": ("alice@example.test",)}, deferred=True)
    h = make_harness(directory=directory)
    h.replies()
    h.send(
        "EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n"
    )
    lines = h.replies()
    assert lines[-1] == "250 2.1.0 Ok"  # stops at the pending RCPT
    assert len(directory.pending) == 1, "the second RCPT must not be looked at yet"
    directory.flush()
    assert h.replies() == ["250 2.1.5 Ok"]
    directory.flush()
    assert h.replies() == [
        "550 5.1.1 Recipient address rejected: user unknown",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q000001",
        "221 2.0.0 Bye",
    ]
    assert h.spool.committed[0].body == b"hello\r\n"


def test_a_pipelined_group_is_answered_in_one_write():
    h = make_harness()
    h.ehlo()
    before = h.transport.write_calls
    h.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert h.transport.write_calls == before + 1
    assert h.codes() == ["250", "250", "354"]
    h.send("x\r\n.\r\nNOOP\r\nNOOP\r\n")
    assert h.transport.write_calls == before + 2
    assert h.codes() == ["250", "250", "250"]


def test_250_only_after_the_spool_commit_and_later_commands_wait():
    spool = FakeSpool(hold=True)
    h = make_harness(spool=spool)
    h.ehlo()
    h.send(TX + "x\r\n.\r\nNOOP\r\n")
    assert h.replies()[-1].startswith("354")
    assert spool.committed == []
    spool.release()
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"]


def test_pending_input_is_bounded_by_pausing_the_transport():
    spool = FakeSpool(hold=True)
    h = make_harness(spool=spool)
    h.ehlo()
    h.send(TX + "x\r\n.\r\n")
    h.send(b"NOOP\r\n" * 20000)
    assert h.transport.producerState == "paused"
    spool.release()
    assert h.transport.producerState == "producing"
    assert h.codes().count("250") == 2 + 1 + 20000


def test_commit_failure_gets_a_transient_reply_and_session_survives():
    h = make_harness(spool=FakeSpool(fail_with=OSError(errno.ENOSPC, "No space left on device")))
    h.ehlo()
    h.send(TX + "x\r\n.\r\nNOOP\r\n")
    assert h.replies()[-2:] == ["452 4.3.1 Insufficient system storage", "250 2.0.0 Ok"]


def test_unexpected_exception_gives_451_and_session_continues():
    class Broken(FakeDirectory):
        def resolve(self, address):
            raise RuntimeError("boom")

    h = make_harness(directory=Broken())
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nNOOP\r\n")
    assert h.replies() == [
        "250 2.1.0 Ok",
        "451 4.3.0 Error: internal error, try again later",
        "250 2.0.0 Ok",
    ]


# -- STARTTLS --------------------------------------------------------------


def test_starttls_discards_injected_plaintext_and_resets_state():
    ctx = object()
    h = make_harness(tls=ctx)
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nSTARTTLS\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert h.replies() == ["250 2.1.0 Ok", "220 2.0.0 Ready to start TLS"]
    assert h.transport.tls_started_with is ctx
    # The 220 went out in plaintext, before the handshake began.
    assert h.transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    # After the handshake the session starts over: no HELO, no transaction.
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert h.replies() == ["503 5.5.1 Error: send HELO/EHLO first"]
    h.send("EHLO c\r\n")
    assert "250-STARTTLS" not in h.replies()
    h.send("STARTTLS\r\n")
    assert h.replies() == ["503 5.5.1 Error: TLS already active"]


def test_starttls_unavailable_without_certificate():
    h = make_harness()
    h.ehlo()
    h.send("STARTTLS\r\n")
    assert h.replies() == ["454 4.7.0 TLS not available"]


def test_tls_required_listener_refuses_mail_before_starttls():
    listener = ListenerConfig("submission", "127.0.0.1", 2587, "required", "none")
    h = make_harness(listener=listener, tls=object())
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert h.replies() == ["530 5.7.0 Must issue a STARTTLS command first"]


def test_auth_refused_before_tls():
    h = make_harness(tls=object())
    h.ehlo()
    h.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert h.replies() == ["538 5.7.11 Encryption required for requested authentication mechanism"]


# -- SMTP smuggling ----------------------------------------------------------


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"],
    ids=[
        "lf-dot-lf",
        "cr-dot-cr",
        "crlf-dot-lf",
        "lf-dot-crlf",
        "cr-dot-crlf",
        "crlf-dot-cr",
        "lf-dot-cr",
    ],
)
@pytest.mark.parametrize("step", [1000, 1])
def test_bare_line_endings_never_end_data_and_are_rejected(smuggle, step):
    h = make_harness(config={"limits": {"bare_newlines": "reject"}})
    h.ehlo()
    h.send(TX)
    h.replies()
    payload = (
        b"Subject: x\r\n\r\nhi"
        + smuggle
        + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nevil\r\n.\r\n"
    )
    for i in range(0, len(payload), step):
        h.send(payload[i : i + step])
    assert h.replies() == [
        "550 5.6.11 Message contains bare CR or LF line endings (SMTP smuggling protection)"
    ]
    assert h.spool.committed == []
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_bdat_with_bare_lf_is_rejected():
    h = make_harness(config={"limits": {"bare_newlines": "reject"}})
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    h.replies()
    h.send(b"BDAT 9 LAST\r\nab\n.\ncd\r\n")
    assert h.replies() == [
        "550 5.6.11 Message contains bare CR or LF line endings (SMTP smuggling protection)"
    ]


# -- sizes and limits ------------------------------------------------------------


def test_size_parameter_over_limit_is_refused_at_mail():
    h = make_harness(config={"limits": {"max_message_size": 1000}})
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test> SIZE=1001\r\nMAIL FROM:<a@remote.test> SIZE=1000\r\n")
    assert h.replies() == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.1.0 Ok",
    ]


def test_size_is_enforced_while_data_streams():
    h = make_harness(config={"limits": {"max_message_size": 1000}})
    h.ehlo()
    h.send(TX)
    h.replies()
    for _ in range(50):
        h.send(b"x" * 78 + b"\r\n")
    [spoolfile] = h.spool.opened
    assert spoolfile.aborted and spoolfile.size <= 1000
    h.send(".\r\nNOOP\r\n")
    assert h.replies() == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "250 2.0.0 Ok",
    ]
    assert h.spool.committed == []


def test_long_data_line_is_stored_intact():
    h = make_harness()
    h.ehlo()
    line = b"y" * 5000 + b"\r\n"
    h.send(TX)
    h.send(line + b".\r\n")
    assert h.spool.committed[0].body == line


def test_data_is_streamed_in_chunks_not_accumulated():
    h = make_harness()
    h.ehlo()
    h.send(TX)
    chunk = (b"z" * 998 + b"\r\n") * 64
    for _ in range(200):
        h.send(chunk)
    [spoolfile] = h.spool.opened
    assert spoolfile.size >= 199 * len(chunk)
    assert spoolfile.largest_write <= len(chunk) + 4
    assert len(h.session._inbuf) == 0


def test_command_line_too_long_answered_once_and_session_survives():
    h = make_harness()
    h.ehlo()
    h.send("NOOP " + "A" * 600 + "\r\nNOOP\r\n")
    assert h.replies() == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]
    # Streamed in pieces, the tail is never taken for a second command.
    h.send("MAIL FROM:<" + "B" * 700)
    h.send("QUIT>\r\n")
    h.send("NOOP\r\n")
    assert h.replies() == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_max_recipients():
    h = make_harness(config={"limits": {"max_recipients": 2}})
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\n" + "RCPT TO:<alice@example.test>\r\n" * 3)
    assert h.codes() == ["250", "250", "250", "452"]


def test_idle_timeout_closes_with_421():
    h = make_harness(config={"limits": {"idle_timeout": 30}})
    h.ehlo()
    h.clock.advance(29)
    assert not h.transport.disconnecting
    h.send("NOOP\r\n")
    h.clock.advance(29)
    assert not h.transport.disconnecting
    h.replies()
    h.clock.advance(2)
    assert h.replies() == ["421 4.4.2 Error: timeout exceeded"]
    assert h.transport.disconnecting


def test_connection_limits():
    tracker = ConnectionTracker(max_total=3, max_per_ip=2)
    hs = [make_harness(tracker=tracker, peer="192.0.2.1") for _ in range(2)]
    third = make_harness(tracker=tracker, peer="192.0.2.1")
    assert third.replies() == ["421 4.7.0 Error: too many connections from your address"]
    other = make_harness(tracker=tracker, peer="192.0.2.2")
    assert other.replies()[0].startswith("220")
    fourth = make_harness(tracker=tracker, peer="192.0.2.3")
    assert fourth.replies() == ["421 4.7.0 Error: too many connections"]
    hs[0].session.connectionLost(None)
    again = make_harness(tracker=tracker, peer="192.0.2.1")
    assert again.replies()[0].startswith("220")


def test_too_many_errors_disconnects():
    h = make_harness()
    h.ehlo()
    h.send("BOGUS\r\n" * 25)
    lines = h.replies()
    assert lines[-1] == "421 4.7.0 Error: too many errors"
    assert lines.count("500 5.5.2 Error: command not recognized") == 20
    assert h.transport.disconnecting


def test_http_request_is_dropped():
    h = make_harness()
    h.replies()
    h.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.replies() == ["421 4.7.0 This is an SMTP server, not an HTTP proxy"]
    assert h.transport.disconnecting


def test_binary_garbage_gets_errors_not_crashes():
    h = make_harness()
    h.ehlo()
    h.send(bytes(range(256)) + b"\r\n\xff\xfe\r\nNOOP\r\n")
    assert h.codes()[-1] == "250"


# -- command sequencing and parameters ------------------------------------------------


def test_sequencing_errors():
    h = make_harness()
    h.replies()
    h.send("MAIL FROM:<a@remote.test>\r\nEHLO c\r\n")
    assert h.replies()[0] == "503 5.5.1 Error: send HELO/EHLO first"
    h.send(
        "RCPT TO:<alice@example.test>\r\nDATA\r\nMAIL FROM:<a@remote.test>\r\nMAIL FROM:<a@remote.test>\r\nDATA\r\n"
    )
    assert h.codes() == ["503", "503", "250", "503", "554"]


def test_unknown_and_supported_parameters():
    h = make_harness()
    h.ehlo()
    h.send(
        "MAIL FROM:<a@remote.test> FOO=bar\r\nMAIL FROM:<a@remote.test> BODY=BINARYMIME\r\nMAIL FROM:<a@remote.test> BODY=8BITMIME SIZE=100\r\nRCPT TO:<alice@example.test> FOO=1\r\n"
    )
    assert h.codes() == ["555", "555", "250", "555"]


def test_helo_client_cannot_use_esmtp_parameters():
    h = make_harness()
    h.replies()
    h.send("HELO c\r\nMAIL FROM:<a@remote.test> SIZE=10\r\n")
    assert h.replies() == ["250 mx.example.test", "555 5.5.4 MAIL/RCPT parameters require EHLO"]


def test_smtputf8_addresses():
    h = make_harness(directory=FakeDirectory({"jörg@example.test": ("jörg@example.test",)}))
    h.ehlo()
    h.send("MAIL FROM:<jörg@remote.test>\r\n")
    assert h.replies() == ["553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter"]
    h.send(
        "MAIL FROM:<jörg@remote.test> SMTPUTF8\r\nRCPT TO:<jörg@example.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    assert h.codes() == ["250", "250", "354", "250"]
    msg = h.spool.committed[0]
    assert msg.envelope.smtputf8 and b"with UTF8SMTP" in msg.trace_headers


def test_null_sender_postmaster_and_literal_addresses():
    h = make_harness()
    h.ehlo()
    h.send(
        'MAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<Postmaster@EXAMPLE.test>\r\nRCPT TO:<"alice"@example.test>\r\nDATA\r\nx\r\n.\r\n'
    )
    assert h.codes() == ["250", "250", "250", "250", "354", "250"]
    env = h.spool.committed[0].envelope
    assert env.sender.is_null
    assert [str(r) for r in env.recipients] == ["postmaster@example.test", "alice@example.test"]
    h.send("MAIL FROM:<a@[192.0.2.1]>\r\nRCPT TO:<@hop.test:alice@example.test>\r\n")
    assert h.codes() == ["250", "250"]


def test_alias_expands_to_several_mailboxes_with_originals_kept():
    h = make_harness()
    h.ehlo()
    h.send(
        "MAIL FROM:<a@remote.test>\r\nRCPT TO:<team@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nx\r\n.\r\n"
    )
    env = h.spool.committed[0].envelope
    assert [str(r) for r in env.recipients] == ["alice@example.test", "bob@example.test"]
    assert [str(r) for r in env.original_recipients] == ["team@example.test", "team@example.test"]


# -- open relay ------------------------------------------------------------


@pytest.mark.parametrize(
    "rcpt,code",
    [
        ("<victim@other.test>", "550 5.7.1"),
        ("<victim%other.test@example.test>", "550 5.1.1"),
        ("<other.test!victim@example.test>", "550 5.1.1"),
        ('<"victim@other.test"@example.test>', "550 5.1.1"),
        ("<@example.test:victim@other.test>", "550 5.7.1"),
        ("<victim@other.test@example.test>", "501 5.1.3"),
        ("<victim@[192.0.2.99]>", "550 5.7.1"),
        ("<victim@example.test.>", "501 5.1.3"),
        ("<victim@other.test> ", "550 5.7.1"),
    ],
)
def test_address_tricks_never_relay(rcpt, code):
    h = make_harness()
    h.ehlo()
    h.send(f"MAIL FROM:<a@remote.test>\r\nRCPT TO:{rcpt}\r\n")
    assert h.replies()[1].startswith(code)


def test_relay_networks_may_relay():
    h = make_harness(config={"relay_networks": ["192.0.2.0/24"]})
    h.ehlo()
    h.send("MAIL FROM:<a@example.test>\r\nRCPT TO:<someone@other.test>\r\n")
    assert h.codes() == ["250", "250"]


# -- BDAT -----------------------------------------------------------------------


def test_bdat_chunks():
    h = make_harness()
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    h.send(b"BDAT 7\r\nA: b\r\n\r")
    h.send(b"BDAT 7 LAST\r\n\nbody\r\nNOOP\r\n")
    assert h.replies()[2:] == [
        "250 2.0.0 7 octets received",
        "250 2.0.0 Ok: queued as Q000001",
        "250 2.0.0 Ok",
    ]
    assert h.spool.committed[0].body == b"A: b\r\n\r\nbody\r\n"


def test_bdat_without_transaction_consumes_the_chunk():
    h = make_harness()
    h.ehlo()
    h.send(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert h.replies() == ["503 5.5.1 Error: need MAIL command", "250 2.0.0 Ok"]


def test_bdat_syntax_error_closes():
    h = make_harness()
    h.ehlo()
    h.send(b"BDAT ten\r\n")
    assert h.replies() == ["501 5.5.4 Syntax: BDAT chunk-size [LAST]"]
    assert h.transport.disconnecting


def test_data_after_bdat_is_refused():
    h = make_harness()
    h.ehlo()
    h.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nBDAT 3\r\nabcDATA\r\n")
    assert h.codes() == ["250", "250", "250", "503"]


def test_in_flow_delay_slows_clients_when_backlog_is_high():
    spool = FakeSpool()
    spool.backlog_value = 10_000
    h = make_harness(spool=spool, config={"queue": {"in_flow_limit": 100, "in_flow_delay": 1.0}})
    h.ehlo()
    h.send(TX + "x\r\n.\r\nNOOP\r\n")
    assert h.replies()[-1].startswith("354")
    h.clock.advance(1.0)
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001", "250 2.0.0 Ok"]


def test_dsn_parameters_are_advertised_parsed_and_kept():
    h = make_harness()
    h.replies()
    h.send("EHLO c\r\n")
    assert "DSN" in [line[4:] for line in h.replies()]
    h.send(
        "MAIL FROM:<a@remote.test> RET=HDRS ENVID=abc+2Bdef\r\n"
        "RCPT TO:<alice@example.test> NOTIFY=success,FAILURE ORCPT=rfc822;Alice+40example.test\r\n"
        "RCPT TO:<team@example.test> NOTIFY=NEVER\r\n"
        "DATA\r\nx\r\n.\r\n"
    )
    assert h.codes() == ["250", "250", "250", "354", "250"]
    env = h.spool.committed[0].envelope
    assert (env.dsn_ret, env.dsn_envid) == ("HDRS", "abc+def")
    assert [str(r) for r in env.recipients] == ["alice@example.test", "bob@example.test"]
    assert env.dsn_notify == ("SUCCESS,FAILURE", "NEVER")
    assert env.dsn_orcpt == ("rfc822;Alice@example.test", "")


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<a@remote.test> RET=ALL",
        "MAIL FROM:<a@remote.test> ENVID=bad+zz",
        "RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS",
        "RCPT TO:<alice@example.test> NOTIFY=SOMETIMES",
        "RCPT TO:<alice@example.test> ORCPT=noaddress",
    ],
)
def test_bad_dsn_parameters(command):
    h = make_harness()
    h.ehlo()
    if command.startswith("RCPT"):
        h.send("MAIL FROM:<a@remote.test>\r\n")
        h.replies()
    h.send(command + "\r\n")
    assert h.codes() == ["501"]


def test_no_dsn_fields_without_dsn_parameters():
    h = make_harness()
    h.ehlo()
    h.send(TX + "x\r\n.\r\n")
    env = h.spool.committed[0].envelope
    assert (env.dsn_ret, env.dsn_envid, env.dsn_notify, env.dsn_orcpt) == (None, None, (), ())


def test_mail_loop_is_refused_by_received_count():
    h = make_harness(config={"limits": {"max_received_headers": 3}})
    h.ehlo()
    hops = "".join(
        f"Received: from hop{i} by x; Sat, 28 Nov 2026 12:00:00 +0000\r\n" for i in range(4)
    )
    h.send(TX + hops + "Subject: loop\r\n\r\nbody\r\n.\r\n")
    assert h.replies()[-1] == "554 5.4.6 Too many hops (mail loop?)"
    h.send(
        TX + hops[: hops.index("Received", 1)] * 3 + "\r\nReceived: in the body is fine\r\n.\r\n"
    )
    assert h.replies()[-1].startswith("250 2.0.0")
