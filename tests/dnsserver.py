"""A real authoritative DNS server for tests: twisted.names in-process on loopback.

`start_dns_server(reactor)` listens on one ephemeral 127.0.0.1 port, UDP and TCP, and
answers from `Zone`s the test fills (MX, A, AAAA, TXT, CNAME); names outside every
zone get REFUSED, names inside a zone without records NXDOMAIN, a name with other
types NODATA.  Records may change while it runs (the authority's cache is cleared).

It runs on the test process's reactor, so a test that waits for something a
subprocess resolves through it must wait asynchronously (pytest_twisted) rather
than with a blocking sleep.  `blackhole_port()` is a bound UDP port that never
answers: configure it as a nameserver to get query timeouts.

    server = start_dns_server(reactor)
    zone = server.zone("dest.test")
    zone.mx("dest.test", 10, "mx.dest.test")
    zone.a("mx.dest.test", "127.0.0.1")
    ... config {"dns": {"nameservers": [server.address]}} ...
    server.stop()
"""

from __future__ import annotations

import socket

import attrs
from twisted.internet import defer
from twisted.names import authority, dns, server


class Zone(authority.FileAuthority):
    """An in-memory zone (the FileAuthority machinery with records set by calls)."""

    def __init__(self, origin: str, ttl: int = 60):
        self.origin = origin.rstrip(".").lower()
        self.ttl = ttl
        super().__init__(self.origin)

    def loadFile(self, origin):  # FileAuthority's hook, called by __init__
        soa = dns.Record_SOA(
            mname=f"ns.{origin}",
            rname=f"hostmaster.{origin}",
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=self.ttl,
            ttl=self.ttl,
        )
        self.soa = (origin.encode("ascii"), soa)
        self.records = {origin.encode("ascii"): [soa]}

    def add(self, name: str, record) -> Zone:
        key = name.rstrip(".").lower().encode("ascii")
        self.records.setdefault(key, []).append(record)
        self._cache = {}
        return self

    def remove(self, name: str) -> Zone:
        self.records.pop(name.rstrip(".").lower().encode("ascii"), None)
        self._cache = {}
        return self

    def mx(self, name: str, preference: int, exchange: str) -> Zone:
        return self.add(name, dns.Record_MX(preference, exchange, ttl=self.ttl))

    def null_mx(self, name: str) -> Zone:
        return self.add(name, dns.Record_MX(0, b"", ttl=self.ttl))

    def a(self, name: str, address: str) -> Zone:
        return self.add(name, dns.Record_A(address, ttl=self.ttl))

    def aaaa(self, name: str, address: str) -> Zone:
        return self.add(name, dns.Record_AAAA(address, ttl=self.ttl))

    def txt(self, name: str, *strings: str | bytes) -> Zone:
        data = [s.encode("utf-8") if isinstance(s, str) else s for s in strings]
        return self.add(name, dns.Record_TXT(*data, ttl=self.ttl))

    def cname(self, name: str, target: str) -> Zone:
        return self.add(name, dns.Record_CNAME(target, ttl=self.ttl))


@attrs.define
class DNSServer:
    """A running server; `address` is "127.0.0.1:PORT" for `[dns] nameservers`."""

    host: str
    port: int
    factory: server.DNSServerFactory
    tcp: object = None
    udp: object = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def zone(self, origin: str, ttl: int = 60) -> Zone:
        zone = Zone(origin, ttl)
        self.factory.resolver.resolvers.insert(0, zone)
        self.factory.canRecurse = False
        return zone

    def stop(self) -> defer.Deferred:
        ds = [defer.maybeDeferred(p.stopListening) for p in (self.udp, self.tcp) if p is not None]
        self.udp = self.tcp = None
        return defer.DeferredList(ds)


def start_dns_server(reactor, host: str = "127.0.0.1", attempts: int = 20) -> DNSServer:
    """Listen on one free port for both UDP and TCP (retrying if UDP's is taken)."""
    factory = server.DNSServerFactory(authorities=[])
    last: Exception | None = None
    for _ in range(attempts):
        tcp = reactor.listenTCP(0, factory, interface=host)
        port = tcp.getHost().port
        try:
            udp = reactor.listenUDP(
                port, dns.DNSDatagramProtocol(controller=factory), interface=host
            )
        except Exception as e:  # CannotListenError: the UDP port is in use
            last = e
            tcp.stopListening()
            continue
        return DNSServer(host, port, factory, tcp, udp)
    raise RuntimeError(f"no free UDP+TCP port pair on {host}: {last}")


def blackhole_port(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """A bound UDP socket that never answers (close it when done) and its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock, sock.getsockname()[1]
