"""The spamd client and `SpamCheck`: reply parsing, tags, actions, and a real spamd."""

from __future__ import annotations

import socket
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from mta.interfaces import IPolicyCheck
from mta.policy.daemons import DaemonError, daemon_endpoint
from mta.policy.pipeline import CHECK_FAILED, CHECK_TIMEOUT, PolicyPipeline
from mta.policy.spamd import (
    SPAM_REJECTED,
    SpamCheck,
    SpamdClient,
    SpamResult,
    parse_reply,
    parse_tell_reply,
    spam_headers,
    strip_spam_headers,
    tell_blocking,
    tell_request,
)
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.testing import MemoryBody
from tests.policy.conftest import GTUBE, bayes_counts

HEAD = (
    b"From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: test\r\n"
    b"Message-ID: <t-1@example.test>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
)
SPAM = HEAD + b"This is the GTUBE\r\n\r\n" + GTUBE + b"\r\n"
HAM = HEAD + b"Hello Bob,\r\n\r\nthe meeting is at ten tomorrow.\r\n\r\nAlice\r\n"


def context(message: bytes, **fields) -> PolicyContext:
    fields.setdefault("queue_id", "Q1")
    return PolicyContext("192.0.2.1", "smtp", body=MemoryBody(message), size=len(message), **fields)


def spam_check(reactor, address: str, **kw) -> SpamCheck:
    return SpamCheck(SpamdClient(daemon_endpoint(reactor, address)), reactor, **kw)


def unique(message: bytes) -> bytes:
    """`message` as one spamd's Bayes has not seen (scans auto-learn, and Bayes knows a
    message by its Message-ID and by its Date and body)."""
    tag = uuid.uuid4().hex.encode()
    return message.replace(b"<t-1@", b"<%s@" % tag) + b"ref " + tag + b"\r\n"


def headers_of(verdict: Verdict) -> bytes:
    return b"".join(verdict.headers)


# -- without a daemon -----------------------------------------------------------------


def test_parse_symbols_reply():
    data = (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 17\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
        b"GTUBE,NO_RECEIVED"
    )
    assert parse_reply(data) == SpamResult(True, 1000.0, 5.0, ("GTUBE", "NO_RECEIVED"))
    ham = b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; -0.1 / 5.0\r\n\r\n"
    assert parse_reply(ham) == SpamResult(False, -0.1, 5.0, ())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.1 76 Bad header line\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; x / y\r\n\r\n",
    ],
)
def test_unusable_replies_are_errors(data):
    with pytest.raises(DaemonError):
        parse_reply(data)


def test_headers_fold_long_rule_lists():
    tests = [f"RULE_NUMBER_{i}" for i in range(12)]
    status, score, flag = spam_headers(7.25, 5.0, tests, True)
    assert status.startswith(b"X-Spam-Status: Yes, score=7.2 required=5.0 tests=RULE_NUMBER_0,")
    assert all(len(line) <= 78 for line in status.split(b"\r\n"))
    assert status.endswith(b"RULE_NUMBER_11\r\n") and b"\r\n\t" in status
    assert score == b"X-Spam-Score: 7.2\r\n"
    assert flag == b"X-Spam-Flag: YES\r\n"
    assert spam_headers(1.0, 5.0, (), False) == (
        b"X-Spam-Status: No, score=1.0 required=5.0 tests=none\r\n",
        b"X-Spam-Score: 1.0\r\n",
    )


def test_actions_and_threshold():
    result = SpamResult(False, 4.0, 5.0, ("SOME_RULE",))
    check = SpamCheck(SpamdClient(None), None)
    verdict = check.verdict(result)
    assert verdict.action is Action.CONTINUE and b"X-Spam-Status: No" in headers_of(verdict)
    # Our own threshold overrides spamd's required score.
    strict = SpamCheck(SpamdClient(None), None, threshold=3.0, action="reject")
    verdict = strict.verdict(result)
    assert verdict.action is Action.REJECT and verdict.reply == SPAM_REJECTED
    quarantine = SpamCheck(SpamdClient(None), None, threshold=3.0, action="quarantine")
    verdict = quarantine.verdict(result, "Q9")
    assert verdict.action is Action.QUARANTINE
    assert b"X-Spam-Flag: YES" in headers_of(verdict) and "score 4" in verdict.reason
    with pytest.raises(ValueError):
        SpamCheck(SpamdClient(None), None, action="drop")


def test_too_big_is_tagged_not_scanned_and_submission_is_skipped():
    check = SpamCheck(SpamdClient(None), None, max_size=100)
    verdict = check.check(Phase.DATA, context(HAM + b"x" * 200))
    assert verdict.action is Action.CONTINUE
    assert headers_of(verdict).startswith(b"X-Spam-Status: Unknown, not scanned (size=")
    assert check.check(Phase.DATA, context(SPAM, authenticated_as="a@x.test")) is Verdict.CONTINUE
    verifyObject(IPolicyCheck, check)


# -- against a real spamd ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_gtube_is_spam(spamd_server):
    from twisted.internet import reactor

    check = spam_check(reactor, spamd_server.address, action="reject")
    verdict = await check.check(Phase.DATA, context(SPAM))
    assert verdict.action is Action.REJECT
    assert verdict.reply.code == 550 and verdict.reply.enhanced == "5.7.1"
    tagged = spam_check(reactor, spamd_server.address)
    verdict = await tagged.check(Phase.DATA, context(SPAM))
    assert verdict.action is Action.CONTINUE
    headers = headers_of(verdict)
    assert headers.startswith(b"X-Spam-Status: Yes, score=100")
    assert b"GTUBE" in headers and b"X-Spam-Flag: YES\r\n" in headers


@pytest_twisted.ensureDeferred
async def test_clean_message_passes(spamd_server):
    from twisted.internet import reactor

    check = spam_check(reactor, spamd_server.address, action="reject")
    verdict = await check.check(Phase.DATA, context(HAM))
    assert verdict.action is Action.CONTINUE
    assert headers_of(verdict).startswith(b"X-Spam-Status: No, score=")
    assert b"X-Spam-Flag" not in headers_of(verdict)


@pytest_twisted.ensureDeferred
async def test_quarantine_through_the_pipeline(spamd_server):
    from twisted.internet import reactor

    check = spam_check(reactor, spamd_server.address, action="quarantine")
    pipeline = PolicyPipeline([check], reactor, timeout=60)
    verdict = await pipeline.run(Phase.DATA, context(SPAM))
    assert verdict.action is Action.QUARANTINE and verdict.reason.startswith("spam (score 1000")
    assert b"X-Spam-Flag: YES" in headers_of(verdict)


@pytest_twisted.ensureDeferred
async def test_spamd_down_fails_closed():
    from twisted.internet import reactor

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    pipeline = PolicyPipeline([spam_check(reactor, address)], reactor, timeout=60)
    verdict = await pipeline.run(Phase.DATA, context(SPAM))
    assert verdict.action is Action.TEMPFAIL and verdict.reply == CHECK_FAILED
    open_pipeline = PolicyPipeline([spam_check(reactor, address)], reactor, fail_open=True)
    verdict = await open_pipeline.run(Phase.DATA, context(SPAM))
    assert verdict.action is Action.ACCEPT and not verdict.headers


@pytest_twisted.ensureDeferred
async def test_silent_spamd_times_out():
    from twisted.internet import reactor

    with socket.socket() as server:  # accepts (in the kernel) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        pipeline = PolicyPipeline([spam_check(reactor, address)], reactor, timeout=0.5)
        verdict = await pipeline.run(Phase.DATA, context(SPAM))
    assert verdict.action is Action.TEMPFAIL and verdict.reply == CHECK_TIMEOUT
    assert verdict.reply.code == 451


@pytest_twisted.ensureDeferred
async def test_tell_learns(spamd_server):
    from twisted.internet import reactor

    client = SpamdClient(daemon_endpoint(reactor, spamd_server.address))
    message = unique(HAM)
    spam, ham = bayes_counts(spamd_server)
    result = await client.tell(message, spam=False)
    assert result.learned and result.status.startswith("SPAMD/1.1 0")
    assert bayes_counts(spamd_server) == (spam, ham + 1)
    again = await client.tell(message, spam=False)  # Bayes already holds it as ham
    assert not again.learned
    assert bayes_counts(spamd_server) == (spam, ham + 1)


def test_tell_blocking_reaches_the_same_database(spamd_server):
    message = unique(SPAM)
    spam, ham = bayes_counts(spamd_server)
    assert tell_blocking(spamd_server.address, message, True).learned
    assert bayes_counts(spamd_server) == (spam + 1, ham)


def test_tell_blocking_errors_say_what_happened():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(DaemonError, match=f"cannot reach spamd at {address}: "):
        tell_blocking(address, HAM, True)
    with socket.socket() as server:  # accepts (in the kernel) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(DaemonError, match="did not answer within 0.2 s"):
            tell_blocking(address, HAM, True, timeout=0.2)


def test_tell_request_and_replies():
    request = tell_request(b"Subject: x\r\n\r\nhi\r\n", spam=True, user="mta")
    assert request == (
        b"TELL SPAMC/1.5\r\nContent-length: 18\r\nUser: mta\r\n"
        b"Message-class: spam\r\nSet: local\r\n\r\nSubject: x\r\n\r\nhi\r\n"
    )
    assert b"Message-class: ham\r\n" in tell_request(b"", spam=False)
    learned = parse_tell_reply(b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n\r\n")
    assert learned.learned and learned.status == "SPAMD/1.1 0 EX_OK"
    assert not parse_tell_reply(b"SPAMD/1.1 0 EX_OK\r\n\r\n\r\n").learned
    # What spamd 4.0 without --allow-tell answers:
    refused = (
        b"SPAMD/1.0 69 Service Unavailable: TELL commands are not enabled,"
        b" set the --allow-tell switch.\r\n"
    )
    with pytest.raises(DaemonError, match="spamd refused TELL: 69 .*--allow-tell"):
        parse_tell_reply(refused)
    with pytest.raises(DaemonError, match="not a spamd answer"):
        parse_tell_reply(b"")


def test_strip_spam_headers_removes_our_tags_only():
    tests = [f"RULE_NUMBER_{i}" for i in range(12)]
    tags = b"".join(spam_headers(7.25, 5.0, tests, True))
    message = b"Received: from x\r\n" + tags + b"X-Spammy: keep\r\n" + HAM
    assert strip_spam_headers(message) == b"Received: from x\r\nX-Spammy: keep\r\n" + HAM
    body_only = b"X-Spam-Flag: YES in the body\r\n"
    assert strip_spam_headers(HEAD + body_only) == HEAD + body_only
    assert strip_spam_headers(b"no header end") == b"no header end"
    lf = message.replace(b"\r\n", b"\n")
    assert strip_spam_headers(lf) == b"Received: from x\nX-Spammy: keep\n" + HAM.replace(
        b"\r\n", b"\n"
    )


def test_deferred_is_cancellable():
    """Cancelling a scan (the pipeline's timeout) aborts the connection attempt."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    d = SpamdClient(daemon_endpoint(reactor, "127.0.0.1:783")).symbols(HAM)
    d.cancel()
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(defer.CancelledError)
