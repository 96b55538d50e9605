"""The ESMTP client state machine over StringTransport with an injected Clock."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mta.delivery.smtpclient import (
    BodyReader,
    DotStuffer,
    Message,
    SessionError,
    SMTPClientProtocol,
    Timeouts,
    parse_reply,
    xtext_encode,
)
from mta.envelope import Address, BodyType, Reply
from mta.queue.body import FileBody
from mta.smtp.parse import xtext_decode

SENDER = Address("alice", "example.test")
BOB = Address("bob", "dest.test")
CAROL = Address("carol", "dest.test")


class TLSStringTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.tls_started = None

    def startTLS(self, context):
        self.tls_started = context


class Body:
    def __init__(self, *chunks: bytes):
        self.chunks = list(chunks)

    def read(self):
        return defer.succeed(self.chunks.pop(0) if self.chunks else b"")


def connect():
    clock = task.Clock()
    proto = SMTPClientProtocol(clock, Timeouts(), peer="mx.dest.test[127.0.0.1]")
    transport = TLSStringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def take(transport) -> bytes:
    out = transport.value()
    transport.clear()
    return out


def establish(
    proto, transport, exts=(b"PIPELINING", b"SIZE 1000", b"8BITMIME"), tls="opportunistic", ctx=None
):
    d = defer.Deferred.fromCoroutine(proto.establish("mx.example.test", tls, ctx))
    proto.dataReceived(b"220 mx.dest.test ESMTP\r\n")
    assert take(transport) == b"EHLO mx.example.test\r\n"
    lines = [b"mx.dest.test", *exts]
    proto.dataReceived(
        b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
    )
    return d


def message(*rcpts, body=None, size=100, **kw):
    return Message(SENDER, tuple(rcpts), size, body or Body(b"Subject: x\r\n\r\nhi\r\n"), **kw)


def test_parse_reply():
    r = parse_reply([b"250-2.1.0 first", b"250 2.1.0 second"])
    assert r == Reply(250, "2.1.0", "first\nsecond")
    assert parse_reply([b"554 no thanks"]) == Reply(554, "", "no thanks")


@pytest.mark.parametrize(
    "chunks",
    [
        [b".a\r\n.b\r\nc\r\n"],
        [b".a\r", b"\n.b\r\n", b"c\r\n"],
        [b".a\r\n", b".b\r\nc", b"\r\n"],
        [b".", b"a\r\n.", b"b\r\nc\r\n"],
    ],
)
def test_dot_stuffing_across_buffers(chunks):
    s = DotStuffer()
    out = b"".join(s.feed(c) for c in chunks) + s.finish()
    assert out == b"..a\r\n..b\r\nc\r\n.\r\n"


def test_dot_stuffing_adds_missing_line_end():
    s = DotStuffer()
    assert s.feed(b"no newline") + s.finish() == b"no newline\r\n.\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        [b"a\r\n.\r\nb\r\n"],  # a line with a single dot, in the middle
        [b"a\r\n", b".", b"\r\nb\r\n"],
        [b"a\r", b"\n.\r", b"\nb\r\n"],
    ],
)
def test_a_single_dot_line_is_stuffed_however_it_is_split(chunks):
    s = DotStuffer()
    assert b"".join(s.feed(c) for c in chunks) + s.finish() == b"a\r\n..\r\nb\r\n.\r\n"


@pytest.mark.parametrize(
    "chunks, wire",
    [
        # A bare LF or CR never reaches the peer, where it could end the DATA early.
        ([b"a\n.\nMAIL FROM:<x@y>\n"], b"a\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"),
        ([b"a\r.\rb"], b"a\r\n..\r\nb\r\n.\r\n"),
        ([b"a\r", b".\r", b"\n"], b"a\r\n..\r\n.\r\n"),
        ([b"a\r\n", b"\n.\n"], b"a\r\n\r\n..\r\n.\r\n"),
        ([b"end with a bare CR\r"], b"end with a bare CR\r\n.\r\n"),
    ],
)
def test_bare_line_endings_become_crlf(chunks, wire):
    s = DotStuffer()
    assert b"".join(s.feed(c) for c in chunks) + s.finish() == wire


def test_pipelined_transaction_per_recipient_replies():
    proto, transport, _ = connect()
    d = establish(proto, transport)
    assert proto.extensions["SIZE"] == "1000"
    assert d.called
    m = Message(
        SENDER, (BOB, CAROL), 100, Body(b"Subject: x\r\n\r\n", b".dot\r\n"), BodyType.EIGHT_BIT
    )
    sd = defer.Deferred.fromCoroutine(proto.send(m))
    # MAIL, both RCPTs and DATA in one write
    assert take(transport) == (
        b"MAIL FROM:<alice@example.test> SIZE=100 BODY=8BITMIME\r\n"
        b"RCPT TO:<bob@dest.test>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n"
    )
    proto.dataReceived(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
    assert take(transport) == b"Subject: x\r\n\r\n..dot\r\n.\r\n"
    proto.dataReceived(b"250 2.0.0 queued as X\r\n")
    outcome = sd.result
    assert outcome.sent
    assert outcome.replies[BOB] == Reply(250, "2.0.0", "queued as X")
    assert outcome.replies[CAROL] == Reply(550, "5.1.1", "no such user")


def test_unpipelined_transaction_and_transient_rcpt():
    proto, transport, _ = connect()
    establish(proto, transport, exts=(b"8BITMIME",))
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, CAROL)))
    assert take(transport) == b"MAIL FROM:<alice@example.test>\r\n"
    proto.dataReceived(b"250 ok\r\n")
    assert take(transport) == b"RCPT TO:<bob@dest.test>\r\n"
    proto.dataReceived(b"451 4.3.0 try later\r\n")
    assert take(transport) == b"RCPT TO:<carol@dest.test>\r\n"
    proto.dataReceived(b"250 ok\r\n")
    assert take(transport) == b"DATA\r\n"
    proto.dataReceived(b"354 go\r\n")
    assert take(transport).endswith(b"hi\r\n.\r\n")
    proto.dataReceived(b"250 2.0.0 ok\r\n")
    out = sd.result
    assert out.replies[BOB].code == 451 and out.replies[CAROL].code == 250


def test_mail_refused_applies_to_all():
    proto, transport, _ = connect()
    establish(proto, transport)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, CAROL)))
    take(transport)
    proto.dataReceived(
        b"452 4.3.1 full\r\n503 5.5.1 MAIL first\r\n503 5.5.1 MAIL first\r\n503 no\r\n"
    )
    out = sd.result
    assert out.mail.code == 452
    assert {r.code for r in out.replies.values()} == {452}


def test_size_refusal_sends_nothing():
    proto, transport, _ = connect()
    establish(proto, transport)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, size=5000)))
    assert transport.value() == b""
    assert sd.result.replies[BOB].code == 552
    assert sd.result.replies[BOB].enhanced == "5.3.4"


def test_smtputf8_required_but_not_offered():
    proto, transport, _ = connect()
    establish(proto, transport)
    utf8 = Address("jörg", "dest.test")
    sd = defer.Deferred.fromCoroutine(proto.send(message(utf8, smtputf8=True)))
    assert sd.result.replies[utf8] == Reply(
        553, "5.6.7", "SMTPUTF8 is required, but was not offered by mx.dest.test[127.0.0.1]"
    )
    assert sd.result.local  # our refusal: the server said nothing of the kind


def test_utf8_header_fields_need_smtputf8_too():
    proto, transport, _ = connect()
    establish(proto, transport)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, smtputf8=True, utf8_headers=True)))
    assert transport.value() == b""
    assert sd.result.replies[BOB].enhanced == "5.6.7" and sd.result.local


def test_size_refusal_is_ours_and_a_server_reply_is_not():
    proto, transport, _ = connect()
    establish(proto, transport)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, size=5000)))
    assert sd.result.local
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB)))
    proto.dataReceived(b"550 5.7.1 no\r\n550 5.7.1 no\r\n503 5.5.1 no\r\n")
    assert sd.result.replies[BOB].code == 550 and not sd.result.local


def test_smtputf8_offered_is_requested():
    proto, transport, _ = connect()
    establish(proto, transport, exts=(b"SMTPUTF8",))
    defer.Deferred.fromCoroutine(proto.send(message(Address("jörg", "dest.test"), smtputf8=True)))
    assert take(transport) == b"MAIL FROM:<alice@example.test> SMTPUTF8\r\n"


def test_starttls_when_offered():
    proto, transport, _ = connect()
    ctx = object()
    d = establish(proto, transport, exts=(b"STARTTLS", b"PIPELINING"), ctx=ctx)
    assert take(transport) == b"STARTTLS\r\n"
    proto.dataReceived(b"220 2.0.0 go ahead\r\n")
    assert transport.tls_started is ctx
    proto.handshakeCompleted()
    assert take(transport) == b"EHLO mx.example.test\r\n"
    proto.dataReceived(b"250-mx.dest.test\r\n250 SIZE 99\r\n")
    assert d.called and d.result is None
    assert proto.tls and proto.extensions == {"SIZE": "99"}


def test_starttls_handshake_failure_is_a_session_error():
    proto, transport, _ = connect()
    d = establish(proto, transport, exts=(b"STARTTLS",), ctx=object())
    take(transport)
    proto.dataReceived(b"220 go ahead\r\n")
    proto.connectionLost(Failure(ConnectionLost("handshake failed")))
    err = self_failure(d)
    assert err.stage == "tls" and err.reply.enhanced == "4.7.5"


def test_tls_required_but_not_offered():
    proto, transport, _ = connect()
    d = establish(proto, transport, tls="required", ctx=object())
    err = self_failure(d)
    assert err.reply == Reply(
        450, "4.7.10", "TLS is required, but was not offered by mx.dest.test[127.0.0.1]"
    )


def test_tls_none_never_starts_tls():
    proto, transport, _ = connect()
    d = establish(proto, transport, exts=(b"STARTTLS",), tls="none", ctx=object())
    assert d.called and transport.value() == b""


def test_helo_fallback():
    proto, transport, _ = connect()
    d = defer.Deferred.fromCoroutine(proto.establish("me.test", "opportunistic", object()))
    proto.dataReceived(b"220 old\r\n")
    assert take(transport) == b"EHLO me.test\r\n"
    proto.dataReceived(b"502 5.5.1 what\r\n")
    assert take(transport) == b"HELO me.test\r\n"
    proto.dataReceived(b"250 hello\r\n")
    assert d.called and not proto.esmtp


def test_bad_greeting():
    proto, transport, _ = connect()
    d = defer.Deferred.fromCoroutine(proto.establish("me.test"))
    proto.dataReceived(b"554 go away\r\n")
    err = self_failure(d)
    assert err.reply.code == 554 and err.remote  # the server's own words


def test_greeting_timeout_aborts():
    proto, transport, clock = connect()
    d = defer.Deferred.fromCoroutine(proto.establish("me.test"))
    clock.advance(299)
    assert not d.called
    clock.advance(2)
    err = self_failure(d)
    assert err.reply.enhanced == "4.4.2" and err.stage == "greeting"
    assert not err.remote  # our words: the server said nothing
    assert transport.disconnecting


def test_connection_closed_mid_data():
    proto, transport, _ = connect()
    establish(proto, transport)
    body = Body(b"Subject: x\r\n\r\n", b"part two\r\n")
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, body=body)))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    proto.connectionLost(Failure(ConnectionLost()))
    err = self_failure(sd)
    assert err.reply.code == 451 and err.stage == "end of data"


def test_paused_transport_waits_then_times_out():
    proto, transport, clock = connect()
    establish(proto, transport)
    proto.pauseProducing()
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB)))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    take(transport)
    clock.advance(181)
    assert self_failure(sd).stage == "data"


def test_two_messages_with_rset():
    proto, transport, _ = connect()
    establish(proto, transport)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB)))
    proto.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    proto.dataReceived(b"250 ok\r\n")
    assert sd.result.sent
    take(transport)
    rd = defer.Deferred.fromCoroutine(proto.reset())
    assert take(transport) == b"RSET\r\n"
    proto.dataReceived(b"250 ok\r\n")
    assert rd.called
    sd = defer.Deferred.fromCoroutine(proto.send(message(CAROL)))
    assert b"RCPT TO:<carol@dest.test>" in take(transport)
    assert proto.transactions == 2


def test_quit():
    proto, transport, _ = connect()
    establish(proto, transport)
    d = defer.Deferred.fromCoroutine(proto.quit())
    assert take(transport) == b"QUIT\r\n"
    proto.dataReceived(b"221 bye\r\n")
    assert d.called and transport.disconnecting


def test_body_reader_sends_prefix_then_the_queued_message(tmp_path):
    path = tmp_path / "q"
    path.write_bytes(b"Subject: s\r\n\r\nbody\r\nTRAILER")
    body = FileBody(b"Received: x\r\n", str(path), len(b"Subject: s\r\n\r\nbody\r\n"))
    src = BodyReader(b"DKIM-Signature: y\r\n", body)
    out = []
    while True:
        chunk = src.read().result
        if not chunk:
            break
        out.append(chunk)
    assert b"".join(out) == b"DKIM-Signature: y\r\nReceived: x\r\nSubject: s\r\n\r\nbody\r\n"


def self_failure(d):
    assert d.called, "deferred has not fired"
    failures = []
    d.addErrback(failures.append)
    assert failures, f"expected a failure, got {d.result!r}"
    assert failures[0].check(SessionError), failures[0]
    return failures[0].value


DSN_FIELDS = dict(
    dsn_ret="HDRS",
    dsn_envid="env 1+x=y",
    dsn_notify=("SUCCESS,FAILURE", ""),
    dsn_orcpt=("rfc822;info+tag@example.test", ""),
)


@pytest.mark.parametrize(
    "exts, commands",
    [
        pytest.param(
            (b"PIPELINING", b"DSN"),
            b"MAIL FROM:<alice@example.test> RET=HDRS ENVID=env+201+2Bx+3Dy\r\n"
            b"RCPT TO:<bob@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;info+2Btag@example.test\r\n"
            b"RCPT TO:<carol@dest.test>\r\n"
            b"DATA\r\n",
            id="passed-on-when-offered",
        ),
        pytest.param(
            (b"PIPELINING", b"8BITMIME"),
            b"MAIL FROM:<alice@example.test>\r\n"
            b"RCPT TO:<bob@dest.test>\r\n"
            b"RCPT TO:<carol@dest.test>\r\n"
            b"DATA\r\n",
            id="not-sent-without-the-extension",
        ),
    ],
)
def test_dsn_request(exts, commands):
    proto, transport, _ = connect()
    establish(proto, transport, exts=exts)
    sd = defer.Deferred.fromCoroutine(proto.send(message(BOB, CAROL, **DSN_FIELDS)))
    assert take(transport) == commands
    proto.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    take(transport)
    proto.dataReceived(b"250 2.0.0 ok\r\n")
    assert sd.result.sent


def test_dsn_without_a_request_adds_nothing_unpipelined():
    proto, transport, _ = connect()
    establish(proto, transport, exts=(b"DSN",))
    defer.Deferred.fromCoroutine(proto.send(message(BOB)))
    assert take(transport) == b"MAIL FROM:<alice@example.test>\r\n"
    proto.dataReceived(b"250 ok\r\n")
    assert take(transport) == b"RCPT TO:<bob@dest.test>\r\n"


def test_xtext_encode():
    assert xtext_encode("a+b=c d\\e") == "a+2Bb+3Dc+20d+5Ce"
    assert xtext_decode(xtext_encode("plain@x.test")) == "plain@x.test"
    assert xtext_encode("jörg@x") == "j\\x{F6}rg@x"
