"""mta.smtp.proxy: the PROXY v1/v2 header in front of an SMTP session, on a
StringTransport with an injected clock.  The headers are written out byte by byte
from the specification (haproxy.org/download/2.8/doc/proxy-protocol.txt), not by the
parser under test."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mta.config import ConfigError, ListenerConfig, build_config
from mta.policy.pipeline import PolicyPipeline
from mta.policy.relay import RelayCheck
from mta.smtp.proxy import MAX_HEADER, ProxyHeaderError, ProxyHeaderFactory, read_header
from mta.smtp.server import ConnectionTracker, SMTPFactory
from mta.smtp.session import SessionContext
from mta.testing import FakeDirectory, FakeSpool

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_IP = "127.0.0.1"


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    """A v2 header: version 2, `command` (0 LOCAL, 1 PROXY), family/protocol byte."""
    body = addresses + tlvs
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    packed = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, packed, tlvs)


def v2_inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )
    return v2(1, 0x21, packed)


# ---------------------------------------------------------------------- the parser


def test_v1_tcp4_and_the_bytes_after_it():
    header, rest = read_header(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\nEHLO x\r\n")
    assert (header.version, header.command) == (1, "PROXY")
    assert (header.source.host, header.source.port) == ("203.0.113.7", 51000)
    assert (header.destination.host, header.destination.port) == ("192.0.2.1", 25)
    assert rest == b"EHLO x\r\n"


def test_v1_tcp6():
    header, _ = read_header(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 587\r\n")
    assert isinstance(header.source, IPv6Address)
    assert header.source.host == "2001:db8::7"


def test_v1_unknown_carries_no_address():
    header, rest = read_header(b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n")
    assert (header.command, header.source, header.destination) == ("UNKNOWN", None, None)
    assert rest == b""


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY",
        b"PROXY TCP4 203.0.113.7 192.0.2.1 5",
        b"\r\n\r\n\x00\r\nQU",
        SIG + b"\x21\x11\x00\x0c" + b"\x00" * 11,
        b"",
    ],
)
def test_an_incomplete_header_asks_for_more(data):
    assert read_header(data) == (None, b"")


@pytest.mark.parametrize(
    "data, why",
    [
        (b"EHLO client.example\r\n", "signature"),
        (b"GET / HTTP/1.0\r\n\r\n", "signature"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25 9\r\n", "malformed"),
        (b"PROXY TCP4 mx.evil.example 192.0.2.1 51000 25\r\n", "malformed"),
        (b"PROXY TCP4 2001:db8::7 192.0.2.1 51000 25\r\n", "malformed"),
        (b"PROXY TCP6 203.0.113.7 2001:db8::1 51000 25\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 port 25\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 25\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 25\r\n", "malformed"),
        (b"PROXY UDP4 203.0.113.7 192.0.2.1 51000 25\r\n", "malformed"),
        (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\n", "CRLF"),
        (b"PROXY TCP4 " + b"1" * 120, "longer than 107"),
        (SIG + b"\x11\x11\x00\x00", "version 1"),
        (SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12, "malformed v2"),
        (SIG + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed v2"),
        (SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12, "datagram"),
        (SIG + b"\x21\x41\x00\x0c" + b"\x00" * 12, "malformed v2"),
        (v2(1, 0x11, b"\x00" * (MAX_HEADER - 15)), "at most"),
    ],
)
def test_malformed_headers_are_refused(data, why):
    with pytest.raises(ProxyHeaderError, match=why):
        read_header(data)


def test_v2_inet_with_tlvs_skipped():
    tlvs = b"\x02\x00\x0bexample.com" + b"\x04\x00\x03abc"  # AUTHORITY, NOOP
    header, rest = read_header(v2_inet("203.0.113.7", "192.0.2.1", 51000, 465, tlvs) + b"\x16\x03")
    assert (header.version, header.command) == (2, "PROXY")
    assert header.source == IPv4Address("TCP", "203.0.113.7", 51000)
    assert header.destination == IPv4Address("TCP", "192.0.2.1", 465)
    assert rest == b"\x16\x03"  # the TLS ClientHello that followed


def test_v2_inet6():
    header, _ = read_header(v2_inet6("2001:db8::7", "2001:db8::1", 40000, 25))
    assert header.source == IPv6Address("TCP", "2001:db8::7", 40000)


def test_v2_ipv4_mapped_source_is_the_ipv4_address():
    header, _ = read_header(v2_inet6("::ffff:203.0.113.7", "::ffff:192.0.2.1", 40000, 25))
    assert header.source == IPv4Address("TCP", "203.0.113.7", 40000)


def test_v2_local_and_unspec_carry_no_address():
    header, rest = read_header(v2(0, 0x00) + b"QUIT\r\n")
    assert (header.command, header.source, rest) == ("LOCAL", None, b"QUIT\r\n")
    # LOCAL with addresses present: still the proxy's own connection.
    header, _ = read_header(v2(0, 0x11, b"\x01" * 12))
    assert (header.command, header.source) == ("LOCAL", None)
    header, _ = read_header(v2(1, 0x00))
    assert (header.command, header.source) == ("UNKNOWN", None)


# ---------------------------------------------------------------------- the listener


class Proxied:
    """A proxy_protocol listener's factory over a real session factory."""

    def __init__(self, *, config: dict | None = None, timeout: float = 10.0, networks=None):
        data = {
            "hostname": "mx.example.test",
            "local_domains": ["example.test"],
            "postmaster": "postmaster@example.test",
            "relay_networks": ["127.0.0.0/8"],
            "limits": {"proxy_networks": networks or ["127.0.0.0/8", "::1/128"]},
        }
        data.update(config or {})
        self.config = build_config(data)
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.spool = FakeSpool()
        directory = FakeDirectory(
            {"alice@example.test": ("alice@example.test",)}, postmaster="postmaster@example.test"
        )
        relay = RelayCheck(self.config.local_domains, self.config.relay_networks, directory)
        context = SessionContext(
            config=self.config,
            listener=ListenerConfig("smtp", "127.0.0.1", 25, "none", "none", True),
            spool=self.spool,
            pipeline=PolicyPipeline([relay], self.clock),
            clock=self.clock,
        )
        limits = self.config.limits
        self.tracker = ConnectionTracker(limits.max_connections, limits.max_connections_per_ip)
        self.factory = ProxyHeaderFactory(
            SMTPFactory(context, self.tracker),
            self.config.limits.proxy_networks,
            self.clock,
            timeout=timeout,
            listener="smtp",
        )

    def connect(self, peer: str = PROXY_IP):
        addr = IPv4Address("TCP", peer, 40000)
        protocol = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        return protocol, transport


def lines(transport: StringTransport) -> list[str]:
    out = transport.value().decode()
    transport.clear()
    return out.splitlines()


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def named(events, name: str) -> list[dict]:
    return [e for e in events if e.get("event") == name]


def send_message(protocol, transport, rcpt: str) -> list[str]:
    protocol.dataReceived(b"EHLO client.example\r\nMAIL FROM:<bob@remote.example>\r\n")
    protocol.dataReceived(f"RCPT TO:<{rcpt}>\r\n".encode())
    protocol.dataReceived(b"DATA\r\n")
    protocol.dataReceived(b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    return lines(transport)


def test_the_greeting_waits_for_the_header_and_the_session_sees_the_client(events):
    listener = Proxied()
    protocol, transport = listener.connect()
    assert transport.value() == b""  # nothing before the header
    for byte in b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n":  # in pieces
        assert transport.value() == b""
        protocol.dataReceived(bytes([byte]))
    assert lines(transport)[0].startswith("220 mx.example.test")
    assert protocol.wrappedProtocol.peer_ip == "203.0.113.7"
    assert protocol.getPeer() == IPv4Address("TCP", "203.0.113.7", 51000)
    assert protocol.getHost() == IPv4Address("TCP", "192.0.2.1", 25)
    replies = send_message(protocol, transport, "alice@example.test")
    assert "250 2.0.0 Ok: queued as Q000001" in replies
    [message] = listener.spool.committed
    assert message.envelope.client_address == "203.0.113.7"
    assert b"([203.0.113.7])" in message.trace_headers
    [seen] = named(events, "proxy_header")
    assert (seen["client"], seen["proxy"]) == ("203.0.113.7", PROXY_IP)
    assert listener.tracker.per_ip == {"203.0.113.7": 1}


def test_bytes_after_the_header_reach_the_session():
    listener = Proxied()
    protocol, transport = listener.connect()
    protocol.dataReceived(v2_inet("203.0.113.7", "192.0.2.1", 51000, 25) + b"EHLO a.example\r\n")
    replies = lines(transport)
    assert replies[0].startswith("220 ")
    assert replies[1].startswith("250-mx.example.test")


def test_v2_ipv6_client_in_the_received_header():
    listener = Proxied()
    protocol, transport = listener.connect()
    protocol.dataReceived(v2_inet6("2001:db8::7", "2001:db8::1", 40000, 25))
    send_message(protocol, transport, "alice@example.test")
    [message] = listener.spool.committed
    assert message.envelope.client_address == "2001:db8::7"
    assert b"([IPv6:2001:db8::7])" in message.trace_headers


@pytest.mark.parametrize(
    "header", [v2(0, 0x00), b"PROXY UNKNOWN\r\n"], ids=["v2-LOCAL", "v1-UNKNOWN"]
)
def test_local_and_unknown_leave_the_proxys_own_address(header):
    listener = Proxied()
    protocol, transport = listener.connect()
    protocol.dataReceived(header)
    assert lines(transport)[0].startswith("220 ")
    assert protocol.wrappedProtocol.peer_ip == PROXY_IP


def test_relay_follows_the_proxied_client_not_the_proxy():
    """relay_networks holds 127.0.0.0/8, where the proxy is: that does not make the
    outside client it forwards trusted; a proxied client inside 10.0.0.0/8 may relay."""
    listener = Proxied(config={"relay_networks": ["127.0.0.0/8", "10.0.0.0/8"]})
    outside, transport = listener.connect()
    outside.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    replies = send_message(outside, transport, "carol@elsewhere.example")
    assert "550 5.7.1 Relay access denied" in replies
    assert listener.spool.committed == []

    inside, transport = listener.connect()
    inside.dataReceived(b"PROXY TCP4 10.1.2.3 192.0.2.1 51000 25\r\n")
    send_message(inside, transport, "carol@elsewhere.example")
    [message] = listener.spool.committed
    assert message.envelope.client_address == "10.1.2.3"


def test_connection_limits_count_the_proxied_client():
    listener = Proxied(config={"limits": {"proxy_networks": ["127.0.0.1/32"],
                                          "max_connections_per_ip": 1}})  # fmt: skip
    first, _ = listener.connect()
    first.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 1 25\r\n")
    second, transport = listener.connect()
    second.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 2 25\r\n")
    assert lines(transport)[0].startswith("421 4.7.0")
    other, transport = listener.connect()
    other.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 3 25\r\n")
    assert lines(transport)[0].startswith("220 ")


def test_a_forged_header_from_outside_proxy_networks_is_refused(events):
    listener = Proxied(networks=["127.0.0.1/32"])
    protocol, transport = listener.connect("198.51.100.66")
    assert transport.disconnecting
    protocol.dataReceived(b"PROXY TCP4 127.0.0.1 192.0.2.1 51000 25\r\nEHLO x\r\n")
    assert transport.value() == b""  # no greeting, nothing answered
    assert listener.tracker.total == 0  # no session was built, trusted or not
    [refused] = named(events, "proxy_refused")
    assert refused["client"] == "198.51.100.66"
    assert "proxy_networks" in refused["log_format"]


def test_an_ipv4_mapped_proxy_address_is_matched_as_ipv4():
    listener = Proxied(networks=["127.0.0.1/32"])
    assert listener.factory.trusts(IPv6Address("TCP", "::ffff:127.0.0.1", 1))
    assert not listener.factory.trusts(IPv6Address("TCP", "::ffff:127.0.0.2", 1))


@pytest.mark.parametrize(
    "data",
    [b"EHLO client.example\r\n", b"PROXY TCP4 x y 1 2\r\n", b"PROXY TCP4 " + b"9" * 200],
    ids=["no-header", "garbage", "too-long"],
)
def test_a_bad_header_closes_without_a_greeting(events, data):
    listener = Proxied()
    protocol, transport = listener.connect()
    protocol.dataReceived(data)
    assert transport.value() == b""
    assert transport.disconnecting
    protocol.dataReceived(b"EHLO more\r\n")  # ignored
    assert transport.value() == b""
    [bad] = named(events, "proxy_malformed")
    assert bad["proxy"] == PROXY_IP
    assert listener.tracker.total == 0


def test_a_proxy_that_never_sends_the_header_is_dropped(events):
    listener = Proxied(timeout=5.0)
    protocol, transport = listener.connect()
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7")
    listener.clock.advance(4.9)
    assert not transport.disconnecting
    listener.clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""
    [timeout] = named(events, "proxy_timeout")
    assert timeout["timeout"] == 5.0
    protocol.connectionLost(None)
    assert listener.clock.getDelayedCalls() == []


def test_the_timer_stops_once_the_header_is_in():
    listener = Proxied(timeout=5.0)
    protocol, transport = listener.connect()
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    listener.clock.advance(6.0)
    assert not transport.disconnecting
    assert protocol.wrappedProtocol.peer_ip == "203.0.113.7"


def test_closing_releases_the_session():
    listener = Proxied()
    protocol, _ = listener.connect()
    protocol.dataReceived(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 25\r\n")
    assert listener.tracker.total == 1
    protocol.connectionLost(None)
    assert listener.tracker.total == 0


# ---------------------------------------------------------------------- configuration


def test_config_parses_proxy_networks_and_listener_flag():
    cfg = build_config(
        {
            "listener": [{"name": "smtp", "address": "0.0.0.0:25", "proxy_protocol": True}],
            "limits": {"proxy_networks": ["10.0.0.5", "fd00::/64"], "proxy_timeout": 3},
        }
    )
    assert cfg.listeners[0].proxy_protocol is True
    assert cfg.limits.proxy_networks == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("fd00::/64"),
    )
    assert cfg.limits.proxy_timeout == 3.0
    assert build_config({}).listeners[0].proxy_protocol is False


@pytest.mark.parametrize(
    "data, key, text",
    [
        (
            {"listener": [{"name": "smtp", "address": ":25", "proxy_protocol": True}]},
            "listener[0].proxy_protocol",
            "needs [limits] proxy_networks",
        ),
        (
            {"listener": [{"name": "smtp", "address": ":25", "proxy_protocol": "yes"}]},
            "listener[0].proxy_protocol",
            "true or false",
        ),
        ({"limits": {"proxy_networks": ["10.0.0.300/8"]}}, "limits.proxy_networks[0]", "CIDR"),
        ({"limits": {"proxy_networks": "10.0.0.0/8"}}, "limits.proxy_networks", "list"),
        ({"limits": {"proxy_timeout": 0}}, "limits.proxy_timeout", "positive"),
    ],
)
def test_config_errors_name_the_key(data, key, text):
    with pytest.raises(ConfigError) as raised:
        build_config(data)
    assert any(e.key == key and text in str(e) for e in raised.value.errors), str(raised.value)
