"""DNSBLCheck against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from mta.config import DNSConfig
from mta.dns import make_resolver
from mta.interfaces import IPolicyCheck
from mta.policy.dnsbl import DNSBLCheck, client_ip, query_name
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from tests.dnsserver import start_dns_server

V6 = "2001:db8::1"


@pytest.fixture
def dns_server():
    from twisted.internet import reactor

    server = start_dns_server(reactor)
    bl = server.zone("bl.test")
    bl.a("2.0.0.127.bl.test", "127.0.0.2")
    bl.a("1.0.0.127.bl.test", "127.0.0.4")  # loopback is looked up too
    bl.a("3.0.0.127.bl.test", "127.0.0.2")  # also allow-listed
    bl.a("99.2.0.192.bl.test", "127.0.0.10")
    bl.a(query_name(ipaddress.ip_address(V6), "bl.test"), "127.0.0.2")
    bl.a("77.2.0.192.bl.test", "192.0.2.200")  # not a 127/8 answer: not a listing
    bl.txt("2.0.0.127.bl.test", "see https://bl.test/")
    second = server.zone("second.test")
    second.a("99.2.0.192.second.test", "127.0.0.2")
    second.a("50.2.0.192.second.test", "127.255.255.254")  # the list's error code
    wl = server.zone("wl.test")
    wl.a("3.0.0.127.wl.test", "127.0.0.2")
    yield server
    pytest_twisted.blockon(server.stop())


def check(server, zones=("bl.test",), **kw):
    from twisted.internet import reactor

    resolver = make_resolver(DNSConfig(nameservers=(server.address,), timeout=5.0), reactor)
    return DNSBLCheck(resolver, zones, **kw)


async def verdict(c, client: str) -> Verdict:
    v = c.check(Phase.CONNECT, PolicyContext(client, "smtp", "sess1"))
    return v if isinstance(v, Verdict) else await v


def test_query_names_and_client_ip():
    assert query_name(ipaddress.ip_address("192.0.2.99"), "zen.example") == "99.2.0.192.zen.example"
    name = query_name(ipaddress.ip_address("2001:db8::1"), "zen.example")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.zen.example"
    assert client_ip("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")
    assert client_ip("not an address") is None


def test_interface_and_bad_action():
    assert verifyObject(IPolicyCheck, DNSBLCheck(None, ["bl.test"]))
    with pytest.raises(ValueError):
        DNSBLCheck(None, ["bl.test"], action="drop")


@pytest_twisted.ensureDeferred
async def test_listed_client_is_rejected_at_the_greeting(dns_server):
    v = await verdict(check(dns_server, action="reject"), "127.0.0.2")
    assert v.action is Action.REJECT
    assert str(v.reply) == "554 5.7.1 Service unavailable; client [127.0.0.2] listed at bl.test"


@pytest_twisted.ensureDeferred
async def test_listed_client_is_tagged(dns_server):
    v = await verdict(check(dns_server, ("second.test", "bl.test")), "192.0.2.99")
    assert v.action is Action.CONTINUE
    assert v.headers == (b"X-DNSBL: listed at second.test\r\n",)


@pytest_twisted.ensureDeferred
async def test_loopback_ipv6_and_mapped_addresses_are_looked_up(dns_server):
    c = check(dns_server, action="reject")
    assert (await verdict(c, "127.0.0.1")).action is Action.REJECT
    v = await verdict(c, V6)
    assert v.action is Action.REJECT and f"[{V6}]" in v.reply.text
    assert (await verdict(c, "::ffff:127.0.0.2")).action is Action.REJECT


@pytest_twisted.ensureDeferred
async def test_unlisted_error_codes_and_failures_are_not_listings(dns_server):
    c = check(dns_server, ("bl.test", "second.test", "unserved.test"), action="reject")
    for client in ("192.0.2.1", "192.0.2.77", "192.0.2.50", "::1"):
        assert (await verdict(c, client)) is Verdict.CONTINUE, client


@pytest_twisted.ensureDeferred
async def test_relay_networks_and_allow_listed_clients_are_skipped(dns_server):
    c = check(
        dns_server,
        action="reject",
        allow_zones=("wl.test",),
        relay_networks=(ipaddress.ip_network("127.0.0.2/32"),),
    )
    assert c.check(Phase.CONNECT, PolicyContext("127.0.0.2", "smtp")) is Verdict.CONTINUE
    assert (await verdict(c, "127.0.0.3")) is Verdict.CONTINUE
    assert (await verdict(c, "127.0.0.1")).action is Action.REJECT
