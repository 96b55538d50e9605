"""MXResolver against a real twisted.names server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import task

from mta.config import DNSConfig
from mta.delivery.mx import MXResolver, RouteError, Target, parse_host_port
from mta.dns import make_dnspython_resolver, make_resolver, parse_nameserver
from tests.dnsserver import blackhole_port, start_dns_server


@pytest.fixture
def dns_server():
    from twisted.internet import reactor

    server = start_dns_server(reactor)
    zone = server.zone("dest.test")
    zone.mx("dest.test", 20, "mx3.dest.test")
    zone.mx("dest.test", 10, "mx1.dest.test").mx("dest.test", 10, "mx2.dest.test")
    zone.a("mx1.dest.test", "127.0.0.11").a("mx2.dest.test", "127.0.0.12")
    zone.a("mx3.dest.test", "127.0.0.13").aaaa("mx3.dest.test", "::1")
    zone.a("implicit.dest.test", "127.0.0.20")
    zone.null_mx("null.dest.test")
    zone.mx("dangling.dest.test", 10, "nowhere.dest.test")
    zone.txt("dest.test", "v=spf1 -all")
    yield server
    pytest_twisted.blockon(server.stop())


def resolver(server, clock=None, **kw):
    from twisted.internet import reactor

    r = make_resolver(DNSConfig(nameservers=(server.address,), timeout=5.0), reactor)
    return MXResolver(r, clock or task.Clock(), port=2525, random=random.Random(1), **kw)


def test_parse_nameserver_and_host_port():
    assert parse_nameserver("127.0.0.1:5353").port == 5353
    assert parse_nameserver("[::1]:53").host == "::1"
    assert parse_nameserver("192.0.2.1").port == 53
    with pytest.raises(ValueError, match="not an IP"):
        parse_nameserver("dns.example:53")
    assert parse_host_port("smtp.example.net:587") == ("smtp.example.net", 587)
    assert parse_host_port("[::1]:25") == ("::1", 25)


@pytest_twisted.ensureDeferred
async def test_mx_preference_order(dns_server):
    targets = await resolver(dns_server).resolve("dest.test")
    assert [t.preference for t in targets] == [10, 10, 20, 20]
    assert {t.host for t in targets[:2]} == {"mx1.dest.test", "mx2.dest.test"}
    assert targets[2:] == [
        Target("mx3.dest.test", "127.0.0.13", 2525, 20),
        Target("mx3.dest.test", "::1", 2525, 20),
    ]


@pytest_twisted.ensureDeferred
async def test_equal_preference_is_shuffled(dns_server):
    seen = set()
    mx = resolver(dns_server)
    for _ in range(12):
        targets = await mx.resolve("dest.test")
        seen.add(targets[0].host)
    assert seen == {"mx1.dest.test", "mx2.dest.test"}


@pytest_twisted.ensureDeferred
async def test_implicit_mx(dns_server):
    targets = await resolver(dns_server).resolve("implicit.dest.test")
    assert targets == [Target("implicit.dest.test", "127.0.0.20", 2525, 0)]


async def route_error(mx, domain) -> RouteError:
    try:
        await mx.resolve(domain)
    except RouteError as e:
        return e
    raise AssertionError("no RouteError")


@pytest_twisted.ensureDeferred
async def test_null_mx_is_permanent(dns_server):
    e = await route_error(resolver(dns_server), "null.dest.test")
    assert e.permanent and e.reply.code == 556 and e.reply.enhanced == "5.1.10"


@pytest_twisted.ensureDeferred
async def test_nxdomain_is_permanent(dns_server):
    e = await route_error(resolver(dns_server), "nope.dest.test")
    assert e.permanent and e.reply.enhanced == "5.1.2"


@pytest_twisted.ensureDeferred
async def test_mx_without_address_is_permanent(dns_server):
    e = await route_error(resolver(dns_server), "dangling.dest.test")
    assert e.permanent and e.reply.enhanced == "5.4.4"


@pytest_twisted.ensureDeferred
async def test_timeout_is_transient():
    from twisted.internet import reactor

    sock, port = blackhole_port()
    try:
        r = make_resolver(DNSConfig(nameservers=(f"127.0.0.1:{port}",), timeout=0.2), reactor)
        e = await route_error(MXResolver(r, task.Clock()), "dest.test")
    finally:
        sock.close()
    assert not e.permanent and e.reply.code == 451 and "timeout" in e.reply.text


@pytest_twisted.ensureDeferred
async def test_unreachable_hosts_are_skipped_for_a_while(dns_server):
    clock = task.Clock()
    mx = resolver(dns_server, clock, unreachable_for=60)
    first = await mx.resolve("implicit.dest.test")
    mx.mark_unreachable(first[0])
    e = await route_error(mx, "implicit.dest.test")
    assert e.reply.code == 451 and "recently unreachable" in e.reply.text
    clock.advance(61)
    assert await mx.resolve("implicit.dest.test") == first


@pytest_twisted.ensureDeferred
async def test_smarthost_bypasses_mx(dns_server):
    mx = resolver(dns_server, smarthost="mx1.dest.test:587")
    assert await mx.resolve("null.dest.test") == [Target("mx1.dest.test", "127.0.0.11", 587, 0)]


@pytest_twisted.ensureDeferred
async def test_address_literal():
    mx = MXResolver(None, task.Clock(), port=25)
    assert await mx.resolve("[127.0.0.5]") == [Target("[127.0.0.5]", "127.0.0.5", 25, 0)]


def test_target_names_the_host_once_when_it_is_an_address():
    assert str(Target("mx1.dest.test", "127.0.0.11", 25)) == "mx1.dest.test[127.0.0.11]:25"
    assert str(Target("mx3.dest.test", "::1", 25)) == "mx3.dest.test[::1]:25"
    # An address literal or a smarthost given by address: "[127.0.0.5]", not doubled.
    literal = Target("[127.0.0.5]", "127.0.0.5", 25)
    assert str(literal) == "[127.0.0.5]:25" and literal.peer == "[127.0.0.5]"
    assert str(Target("127.0.0.1", "127.0.0.1", 2525)) == "[127.0.0.1]:2525"
    assert str(Target("[IPv6:::1]", "::1", 25)) == "[::1]:25"
    # A DSN's Remote-MTA: the host name, or the address when there is none.
    assert Target("mx1.dest.test", "127.0.0.11", 25).remote_mta == "mx1.dest.test"
    assert literal.remote_mta == "127.0.0.5"


@pytest_twisted.ensureDeferred
async def test_dnspython_resolver_uses_the_same_servers(dns_server):
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    res = make_dnspython_resolver(DNSConfig(nameservers=(dns_server.address,), timeout=5.0))
    answer = await deferToThread(res.resolve, "dest.test", "TXT")
    assert [r.strings for r in answer] == [(b"v=spf1 -all",)]
    assert reactor.running
