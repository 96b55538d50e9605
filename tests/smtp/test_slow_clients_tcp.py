"""Slow clients over real loopback TCP: a trickled command line and a trickled DATA
are closed with 421 4.4.2 (the same rules as in test_session_protocol, on the real
reactor).  Nothing here measures time: a client is only ever kept waiting longer."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from tests.smtp.helpers import make_harness

LIMITS = {"limits": {"idle_timeout": 1, "min_data_rate": 1000}}
GIVE_UP = 100  # trickles before the client stops (about 20 s): the server must close first


class _Trickler(protocol.Protocol):
    """Sends `opening` at once, then `drip` every `interval` seconds once the server
    said `after` (a reply prefix), until the server closes the connection."""

    def __init__(self, opening: bytes, after: bytes, drip: bytes, interval: float = 0.2):
        self.opening, self.after, self.drip, self.interval = opening, after, drip, interval
        self.received = b""
        self.closed = defer.Deferred()
        self._call = None
        self._drips = 0

    def connectionMade(self):
        self.transport.write(self.opening)

    def dataReceived(self, data):
        self.received += data
        if self._call is None and self.after in self.received:
            self._call = reactor.callLater(self.interval, self._drip)

    def _drip(self):
        self._drips += 1
        if self._drips > GIVE_UP:
            self.transport.loseConnection()
            return
        self.transport.write(self.drip)
        self._call = reactor.callLater(self.interval, self._drip)

    def connectionLost(self, reason=None):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.closed.callback(self.received)


@defer.inlineCallbacks
def _serve(client: _Trickler):
    h = make_harness(config=LIMITS)
    h.factory.context.clock = reactor  # sessions of this factory run on the real clock
    port = reactor.listenTCP(0, h.factory, interface="127.0.0.1")
    try:
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        received = yield client.closed
    finally:
        yield port.stopListening()
    return received, h


@pytest_twisted.inlineCallbacks
def test_trickled_command_line_is_closed_over_tcp():
    client = _Trickler(b"EHLO c\r\n", b"250 DSN\r\n", b"N")
    received, _ = yield _serve(client)
    assert received.endswith(b"421 4.4.2 Error: timeout exceeded\r\n")
    assert client._drips < GIVE_UP


@pytest_twisted.inlineCallbacks
def test_trickled_data_is_closed_over_tcp():
    opening = b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
    client = _Trickler(opening, b"354 ", b"x" * 8 + b"\r\n")
    received, h = yield _serve(client)
    assert b"354 End data" in received
    assert received.endswith(b"421 4.4.2 Error: timeout exceeded\r\n")
    assert client._drips < GIVE_UP
    assert h.spool.committed == []
