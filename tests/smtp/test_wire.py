"""mta.smtp.wire.send over real loopback TCP: straight to the socket when nothing is
queued, through the transport's buffer otherwise, bytes always in order."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport

from mta.smtp import wire


class _Server(protocol.Protocol):
    def __init__(self, action):
        self.action = action

    def connectionMade(self):
        self.action(self.transport)


class _Collect(protocol.Protocol):
    def __init__(self):
        self.data = bytearray()
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        self.done.callback(bytes(self.data))


@defer.inlineCallbacks
def _exchange(action):
    """Serve one connection whose server side runs `action(transport)`; return what
    the client received until the server closed."""
    factory = protocol.Factory.forProtocol(lambda: _Server(action))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = _Collect()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", port.getHost().port
        )
        received = yield client.done
    finally:
        yield port.stopListening()
    return received


@pytest_twisted.inlineCallbacks
def test_idle_tcp_transport_is_written_without_registering_for_writes():
    seen = {}

    def action(transport):
        wire.send(transport, b"250 2.0.0 Ok\r\n")
        seen["queued"] = bool(transport._tempDataBuffer) or transport.dataBuffer != b""
        seen["writer"] = transport in reactor.getWriters()
        transport.loseConnection()

    received = yield _exchange(action)
    assert received == b"250 2.0.0 Ok\r\n"
    assert seen == {"queued": False, "writer": False}


@pytest_twisted.inlineCallbacks
def test_bytes_already_queued_go_first():
    def action(transport):
        transport.write(b"first ")
        wire.send(transport, b"second ")
        wire.send(transport, b"third")
        transport.loseConnection()

    received = yield _exchange(action)
    assert received == b"first second third"


@pytest_twisted.inlineCallbacks
def test_what_the_kernel_does_not_take_is_buffered_in_order():
    big = bytes(range(256)) * (16 * 1024)  # 4 MB: more than a loopback socket buffer

    def action(transport):
        wire.send(transport, b"head:")
        wire.send(transport, big)
        wire.send(transport, b":tail")
        transport.loseConnection()

    received = yield _exchange(action)
    assert received == b"head:" + big + b":tail"


@pytest_twisted.inlineCallbacks
def test_nothing_is_sent_after_the_write_side_is_closed():
    def action(transport):
        wire.send(transport, b"bye\r\n")
        transport.loseWriteConnection()

        def later():
            assert transport._writeDisconnected
            wire.send(transport, b"too late\r\n")
            transport.loseConnection()

        reactor.callLater(0.05, later)

    received = yield _exchange(action)
    assert received == b"bye\r\n"


@pytest.mark.parametrize("data", [b"220 ready\r\n", b""])
def test_other_transports_get_a_plain_write(data):
    transport = StringTransport()
    wire.send(transport, data)
    assert transport.value() == data
