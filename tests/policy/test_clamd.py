"""The clamd client and `VirusCheck`: reply parsing, actions, and a real clamd."""

from __future__ import annotations

import base64
import socket
import threading

import pytest
import pytest_twisted
from twisted.internet import threads
from zope.interface.verify import verifyObject

from mta.interfaces import IPolicyCheck
from mta.policy.clamd import ClamdClient, ScanResult, VirusCheck, parse_reply
from mta.policy.daemons import DaemonError, daemon_endpoint, parse_address
from mta.policy.pipeline import CHECK_FAILED, CHECK_TIMEOUT, PolicyPipeline
from mta.policy.verdict import Action, Phase, PolicyContext
from mta.testing import MemoryBody
from tests.policy.conftest import EICAR, MARKER

HEAD = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: t\r\n"
CLEAN = HEAD + b"\r\n" + b"hello world, nothing to see here\r\n" * 5000
ATTACHED = (
    HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--XX\r\n"
    b"Content-Type: application/octet-stream; name=eicar.com\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(EICAR) + b"--XX--\r\n"
)


class CountingBody(MemoryBody):
    """A body that records how it was read (chunk by chunk, and closed)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.closed = False
        self.sizes: list[int] = []

    def chunks(self, chunk_size: int = 262144):
        try:
            for chunk in super().chunks(chunk_size):
                self.sizes.append(len(chunk))
                yield chunk
        finally:
            self.closed = True


def context(message: bytes, body=None, **fields) -> PolicyContext:
    fields.setdefault("queue_id", "Q1")
    body = body if body is not None else MemoryBody(message)
    return PolicyContext("192.0.2.1", "smtp", body=body, size=len(message), **fields)


def virus_check(reactor, address: str, **kw) -> VirusCheck:
    return VirusCheck(ClamdClient(daemon_endpoint(reactor, address), reactor), **kw)


# -- without a daemon -----------------------------------------------------------------


def test_parse_reply():
    assert parse_reply(b"stream: OK\0") == ScanResult(None)
    assert parse_reply(b"stream: Eicar-Test-Signature FOUND\0") == ScanResult(
        "Eicar-Test-Signature"
    )
    assert parse_reply(b"INSTREAM size limit exceeded. ERROR\0").skipped
    for junk in (b"", b"Can't allocate memory ERROR\0", b"what?\0"):
        with pytest.raises(DaemonError):
            parse_reply(junk)


def test_addresses():
    assert parse_address("127.0.0.1:3310") == ("127.0.0.1", 3310)
    assert parse_address("[::1]:3310") == ("::1", 3310)
    assert parse_address("/run/clamav/clamd.ctl") == "/run/clamav/clamd.ctl"
    for bad in ("clamd", "127.0.0.1:x", "127.0.0.1:0", "relative/path", ":3310"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_verdicts():
    check = VirusCheck(ClamdClient(None, None))
    verifyObject(IPolicyCheck, check)
    assert check.verdict(ScanResult(None)).action is Action.CONTINUE
    verdict = check.verdict(ScanResult("Bad.Thing"), "Q1")
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced) == (554, "5.7.0")
    assert verdict.reply.text.endswith("Bad.Thing")
    quarantine = VirusCheck(ClamdClient(None, None), action="quarantine")
    verdict = quarantine.verdict(ScanResult("Bad.Thing"))
    assert verdict.action is Action.QUARANTINE and "Bad.Thing" in verdict.reason
    with pytest.raises(ValueError):
        VirusCheck(ClamdClient(None, None), action="tag")


# -- against a real clamd ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_eicar_is_rejected(clamd_server):
    from twisted.internet import reactor

    verdict = await virus_check(reactor, clamd_server.address).check(Phase.DATA, context(EICAR))
    assert verdict.action is Action.REJECT and verdict.reply.code == 554
    assert "MTA.Test.EICAR" in verdict.reply.text


@pytest_twisted.ensureDeferred
async def test_attachment_and_marker_found_and_quarantined(clamd_server):
    from twisted.internet import reactor

    check = virus_check(reactor, clamd_server.address, action="quarantine")
    verdict = await check.check(Phase.DATA, context(ATTACHED))
    assert verdict.action is Action.QUARANTINE and "MTA.Test.EICAR" in verdict.reason
    # Authenticated submission is scanned too; the marker spans a chunk boundary.
    body = HEAD + b"\r\n" + b"x" * (65536 - len(HEAD) - 10) + MARKER + b"\r\n"
    verdict = await check.check(Phase.DATA, context(body, authenticated_as="a@example.test"))
    assert verdict.action is Action.QUARANTINE and "MTA.Test.Marker" in verdict.reason


@pytest_twisted.ensureDeferred
async def test_clean_message_streams_in_chunks(clamd_server):
    from twisted.internet import reactor

    body = CountingBody(CLEAN)
    pipeline = PolicyPipeline([virus_check(reactor, clamd_server.address)], reactor, timeout=60)
    verdict = await pipeline.run(Phase.DATA, context(CLEAN, body))
    assert verdict.action is Action.ACCEPT
    assert len(body.sizes) > 1 and max(body.sizes) <= 65536 and sum(body.sizes) == len(CLEAN)
    assert body.closed


@pytest_twisted.ensureDeferred
async def test_unix_socket(clamd_socket):
    from twisted.internet import reactor

    verdict = await virus_check(reactor, clamd_socket).check(Phase.DATA, context(EICAR))
    assert verdict.action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_clamd_down_fails_closed_even_when_others_fail_open():
    from twisted.internet import reactor

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    pipeline = PolicyPipeline(
        [virus_check(reactor, address)],
        reactor,
        fail_open=True,
        fail_open_by_check={"clamd": False},
    )
    verdict = await pipeline.run(Phase.DATA, context(CLEAN))
    assert verdict.action is Action.TEMPFAIL and verdict.reply == CHECK_FAILED


@pytest_twisted.ensureDeferred
async def test_silent_clamd_times_out():
    from twisted.internet import reactor

    with socket.socket() as server:  # accepts (in the kernel) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        pipeline = PolicyPipeline([virus_check(reactor, address)], reactor, timeout=0.5)
        verdict = await pipeline.run(Phase.DATA, context(EICAR))
    assert verdict.action is Action.TEMPFAIL and verdict.reply == CHECK_TIMEOUT


@pytest_twisted.ensureDeferred
async def test_over_clamds_stream_limit(clamd_server):
    """The fixture's clamd takes at most 1 MiB (StreamMaxLength)."""
    from twisted.internet import reactor

    big = HEAD + b"\r\n" + b"y" * 1_500_000
    verdict = await virus_check(reactor, clamd_server.address).check(Phase.DATA, context(big))
    assert verdict.action is Action.CONTINUE
    assert verdict.headers == (b"X-Virus-Status: Unscanned, over clamd's StreamMaxLength\r\n",)


class StuckBody(MemoryBody):
    """A body whose first read blocks until released (a hung disk)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.release = threading.Event()

    def chunks(self, chunk_size: int = 262144):
        self.release.wait(30)
        yield from super().chunks(chunk_size)


@pytest_twisted.ensureDeferred
async def test_timeout_while_reading_closes_the_connection():
    from twisted.internet import reactor

    body = StuckBody(CLEAN)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        pipeline = PolicyPipeline([virus_check(reactor, address)], reactor, timeout=0.5)
        try:
            verdict = await pipeline.run(Phase.DATA, context(CLEAN, body))
        finally:
            body.release.set()
        assert verdict.reply == CHECK_TIMEOUT
        # Read on a thread: the reactor must keep running to close the socket.
        received = await threads.deferToThread(read_until_closed, server)
    assert b"\0\0\0" not in received  # no chunk was sent


def read_until_closed(server: socket.socket) -> bytes:
    conn, _ = server.accept()
    with conn:
        conn.settimeout(30)  # a hang here fails the test: the client must close
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # aborted: closed with a reset
    return received
