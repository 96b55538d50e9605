"""What the spamd and clamd clients share: where a scanning daemon listens, and a
Protocol that sends a request and collects the whole reply.

An address is `host:port` (TCP) or an absolute path (a unix socket), as
`[checks] spamd` and `[checks] clamd` spell it; `daemon_endpoint` turns it into a
client endpoint on the injected reactor.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

CONNECT_TIMEOUT = 10.0


class DaemonError(Exception):
    """A scanning daemon answered something we cannot use (or nothing at all)."""


def parse_address(address: str) -> tuple[str, int] | str:
    """`(host, port)` for `host:port`, the path itself for an absolute path; raises
    ValueError saying why otherwise."""
    if address.startswith("/"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"expected host:port or an absolute socket path, got {address!r}")
    return host.strip("[]"), int(port)


def daemon_endpoint(reactor, address: str, timeout: float = CONNECT_TIMEOUT):
    """A client endpoint for `address` (see `parse_address`)."""
    parsed = parse_address(address)
    if isinstance(parsed, str):
        return UNIXClientEndpoint(reactor, parsed, timeout=timeout)
    host, port = parsed
    cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return cls(reactor, host, port, timeout=timeout)


class ReplyCollector(Protocol):
    """Collects everything the daemon sends until it closes the connection (or until
    `complete(data)` says the reply is whole); `reply` fires with the bytes.

    Cancelling `reply` (the pipeline's timeout does) aborts the connection.  `limit`
    bounds what is kept: a daemon that talks for longer is an error."""

    def __init__(self, limit: int = 1024 * 1024, complete=None):
        self._limit = limit
        self._complete = complete
        self._data: list[bytes] = []
        self._size = 0
        self.reply = defer.Deferred(self._cancel)

    def _cancel(self, _d) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.reply.called:
            return
        self._data.append(data)
        self._size += len(data)
        if self._size > self._limit:
            self.reply.errback(DaemonError(f"reply longer than {self._limit} bytes"))
            self.transport.abortConnection()
            return
        if self._complete is not None:
            whole = b"".join(self._data)
            if self._complete(whole):
                self.reply.callback(whole)
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if not self.reply.called:
            self.reply.callback(b"".join(self._data))


async def connect(endpoint, protocol: Protocol) -> Protocol:
    """Connect `protocol` through `endpoint`.  Cancelling gives CancelledError (the
    pipeline's timeout turns that into a timeout), not ConnectingCancelledError."""
    try:
        return await endpoint.connect(_OneProtocol(protocol))
    except ConnectingCancelledError:
        raise defer.CancelledError() from None


class _OneProtocol(Factory):
    noisy = False  # no "Starting factory" line per scanned message

    def __init__(self, protocol: Protocol):
        self._protocol = protocol

    def buildProtocol(self, addr) -> Protocol:
        self._protocol.factory = self
        return self._protocol
