"""The PROXY protocol (HAProxy's v1 text and v2 binary header) in front of a listener.

Behind a TCP load balancer every connection comes from the balancer; the PROXY header
it sends first says who the client really is.  A `proxy_protocol = true` listener
wraps its factory (outside implicit TLS: the header precedes the handshake) in
`ProxyHeaderFactory`:

- a connection from outside `[limits] proxy_networks` is closed at once, logged, and
  never trusted (anyone could send a header naming any address);
- nothing is written and no session exists until the whole header has arrived: a
  header longer than `MAX_HEADER`, malformed, or not complete within the timeout
  closes the connection without a greeting, logged;
- then the listener's factory builds the session for the client's address (so
  connection limits, relay rules, rate limits, DNSBL, SPF, the Received header and
  the logs all see it) and gets the bytes that followed the header.

The header's bytes are decoded by Twisted's own PROXY parsers
(`twisted.protocols.haproxy`); its wrapper is not used because it greets before the
header is read, builds the session for the balancer's address, trusts every source
and waits forever.  A v2 LOCAL command (the balancer's own health check) and v1
UNKNOWN mean "no client address": the session sees the balancer's, as the
specification requires.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

import attrs
from twisted.internet import address, protocol
from twisted.internet.interfaces import IAddress
from twisted.protocols import policies
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from zope.interface import directlyProvides, providedBy

from mta.observe.logging import Logger

log = Logger()

# Bytes read before a header must be complete: a v1 line is at most 107 bytes; v2 is
# 16 bytes plus addresses (36 for IPv6) plus TLVs, which HAProxy keeps small.
MAX_HEADER = 4096
V1_MAX = 107
V2_SIGNATURE = V2Parser.PREFIX
_V1_START = b"PROXY "


class ProxyHeaderError(ValueError):
    """The bytes received are not a PROXY header we accept (the text says why)."""


@attrs.frozen
class ProxyHeader:
    """A parsed header: `source` and `destination` are None for v2 LOCAL, v1
    UNKNOWN and address families without an IP address."""

    version: int
    command: str  # "PROXY" | "LOCAL" | "UNKNOWN" (v1 UNKNOWN; v2 AF_UNSPEC or AF_UNIX)
    source: IAddress | None
    destination: IAddress | None


def read_header(buffer: bytes) -> tuple[ProxyHeader | None, bytes]:
    """The header at the start of `buffer` and the bytes after it, or (None, b"")
    while more bytes are needed.  Raises ProxyHeaderError for anything else."""
    if buffer[:12] == V2_SIGNATURE[: len(buffer)]:
        return _read_v2(buffer)
    if buffer[:6] == _V1_START[: len(buffer)]:
        return _read_v1(buffer)
    raise ProxyHeaderError("does not start with a PROXY v1 or v2 signature")


def _read_v1(buffer: bytes) -> tuple[ProxyHeader | None, bytes]:
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header line longer than {V1_MAX} bytes")
        if b"\n" in buffer:
            raise ProxyHeaderError("v1 header line does not end with CRLF")
        return None, b""
    line, rest = buffer[:end], buffer[end + 2 :]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # HAProxy sends the bare form, which Twisted's parser refuses.
        return ProxyHeader(1, "UNKNOWN", None, None), rest
    try:
        info = V1Parser.parse(line)
    except (InvalidProxyHeader, ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"malformed v1 header {_show(line)}") from None
    if info.source is None:
        return ProxyHeader(1, "UNKNOWN", None, None), rest
    fields = line.split(b" ")
    if len(fields) != 6:
        raise ProxyHeaderError(f"malformed v1 header {_show(line)}")
    want = 4 if fields[1] == b"TCP4" else 6
    source = _ip_address(fields[2], fields[4], want, line)
    destination = _ip_address(fields[3], fields[5], want, line)
    return ProxyHeader(1, "PROXY", source, destination), rest


def _ip_address(host: bytes, port: bytes, version: int, line: bytes) -> IAddress:
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
        number = int(port)
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError(f"malformed v1 header {_show(line)}") from None
    if ip.version != version or not port.isdigit() or not 0 <= number <= 65535:
        raise ProxyHeaderError(f"malformed v1 header {_show(line)}")
    return _address(ip, number)


def _read_v2(buffer: bytes) -> tuple[ProxyHeader | None, bytes]:
    if len(buffer) < 16:
        return None, b""
    if buffer[12] >> 4 != 2:
        raise ProxyHeaderError(f"v2 signature with version {buffer[12] >> 4}")
    size = 16 + struct.unpack("!H", buffer[14:16])[0]
    if size > MAX_HEADER:
        raise ProxyHeaderError(f"v2 header of {size} bytes (at most {MAX_HEADER})")
    if len(buffer) < size:
        return None, b""
    header, rest = buffer[:size], buffer[size:]
    command = "LOCAL" if header[12] & 0x0F == 0 else "PROXY"
    try:
        info = V2Parser.parse(header)
    except (InvalidProxyHeader, KeyError, ValueError):
        raise ProxyHeaderError("malformed v2 header") from None
    if command == "LOCAL":
        return ProxyHeader(2, "LOCAL", None, None), rest
    source, destination = info.source, info.destination
    if isinstance(source, address.UNIXAddress) or source is None:
        return ProxyHeader(2, "UNKNOWN", None, None), rest  # AF_UNSPEC, AF_UNIX
    if source.type != "TCP":
        raise ProxyHeaderError("v2 header for a datagram connection")
    return (
        ProxyHeader(
            2,
            "PROXY",
            _address(ipaddress.ip_address(source.host), source.port),
            _address(ipaddress.ip_address(destination.host), destination.port),
        ),
        rest,
    )


def _address(ip, port: int) -> IAddress:
    """A Twisted address; an IPv4-mapped IPv6 address becomes the IPv4 address, so
    IPv4 relay networks and rate limits apply to it."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return address.IPv4Address("TCP", str(ip), port)
    return address.IPv6Address("TCP", str(ip), port)


def _show(data: bytes) -> str:
    return repr(data[:V1_MAX].decode("ascii", "replace"))


def _host_ip(addr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(getattr(addr, "host", "").split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ProxyHeaderFactory(protocol.Factory):
    """Wraps a listener's factory: each connection from `networks` must open with a
    PROXY header within `timeout` seconds (on `clock`); others are closed."""

    noisy = False

    def __init__(
        self,
        wrapped: protocol.Factory,
        networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
        clock,
        *,
        timeout: float,
        listener: str,
    ):
        self.wrapped = wrapped
        self.networks = tuple(networks)
        self.clock = clock
        self.timeout = timeout
        self.listener = listener

    def doStart(self):
        self.wrapped.doStart()

    def doStop(self):
        self.wrapped.doStop()

    def trusts(self, addr) -> bool:
        ip = _host_ip(addr)
        return ip is not None and any(ip in net for net in self.networks)

    def buildProtocol(self, addr):
        if not self.trusts(addr):
            log.warn(
                "connection from {client} on {listener} refused:"
                " not in [limits] proxy_networks, so it may not send a PROXY header",
                event="proxy_refused",
                client=getattr(addr, "host", str(addr)),
                listener=self.listener,
            )
            return _Closing()
        return ProxyHeaderReceiver(self, addr)


class _Closing(protocol.Protocol):
    """Closes the connection without a byte written."""

    def connectionMade(self):
        self.transport.loseConnection()


class ProxyHeaderReceiver(policies.ProtocolWrapper):
    """Reads the header; then builds the listener's protocol for the client's address
    and is its transport (writes, TLS, flow control pass through; `getPeer` and
    `getHost` answer the header's addresses)."""

    def __init__(self, factory: ProxyHeaderFactory, proxy_address):
        policies.ProtocolWrapper.__init__(self, factory, None)
        self._proxy = getattr(proxy_address, "host", str(proxy_address))
        self._buffer = b""
        self._timer = None
        self._failed = False
        self._peer: IAddress | None = None
        self._host: IAddress | None = None

    def makeConnection(self, transport):
        # The wrapped protocol is connected only once the header is in (see dataReceived).
        directlyProvides(self, providedBy(transport))
        protocol.Protocol.makeConnection(self, transport)

    def connectionMade(self):
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def logPrefix(self) -> str:
        return "proxy"

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._failed:
            return
        self._buffer += data
        try:
            header, rest = read_header(self._buffer)
        except ProxyHeaderError as e:
            self._fail(str(e))
            return
        if header is None:
            return
        self._buffer = b""
        self._cancel_timer()
        self._start(header, rest)

    def _start(self, header: ProxyHeader, rest: bytes) -> None:
        self._peer, self._host = header.source, header.destination
        peer = self.getPeer()
        log.debug(
            "connection from {client} via proxy {proxy} on {listener} (PROXY v{version} {command})",
            event="proxy_header",
            client=getattr(peer, "host", str(peer)),
            proxy=self._proxy,
            listener=self.factory.listener,
            version=header.version,
            command=header.command,
        )
        wrapped = self.factory.wrapped.buildProtocol(peer)
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = wrapped
        wrapped.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            wrapped.dataReceived(rest)

    def _fail(self, reason: str) -> None:
        self._failed = True
        self._buffer = b""
        self._cancel_timer()
        log.warn(
            "closing connection from proxy {proxy} on {listener}: bad PROXY header: {reason}",
            event="proxy_malformed",
            proxy=self._proxy,
            listener=self.factory.listener,
            reason=reason,
        )
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        self._failed = True
        self._buffer = b""
        log.warn(
            "closing connection from proxy {proxy} on {listener}:"
            " no complete PROXY header within {timeout}s",
            event="proxy_timeout",
            proxy=self._proxy,
            listener=self.factory.listener,
            timeout=self.factory.timeout,
        )
        self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def getPeer(self) -> IAddress:
        return self._peer or self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self._host or self.transport.getHost()

    def connectionLost(self, reason):
        self._cancel_timer()
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)
