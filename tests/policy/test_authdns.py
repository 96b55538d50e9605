"""`AuthDNS`'s own answer cache, against a real twisted.names server on loopback: kept
for the answer's TTL (negative answers for the SOA's negative TTL), never for a
failure, and bounded.  dnspython's cache behind it is switched off in these tests
so that what they see is ours (its clock is the real one)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from mta.config import DNSConfig
from mta.dns import make_dnspython_resolver
from mta.policy.authdns import AuthDNS, DNSTemporaryError
from tests.dnsserver import start_dns_server
from tests.policy.authzone import ServfailAuthority, in_thread


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server():
    server = start_dns_server(reactor)
    server.factory.resolver.resolvers.insert(0, ServfailAuthority("servfail.test"))
    yield server
    pytest_twisted.blockon(server.stop())


def auth_dns(server, clock, **kw) -> AuthDNS:
    dns = AuthDNS(make_dnspython_resolver(DNSConfig((server.address,), 2.0)), clock=clock, **kw)
    dns.resolver.cache = None
    return dns


@pytest_twisted.ensureDeferred
async def test_an_answer_is_kept_for_its_ttl(server):
    zone = server.zone("cached.test", ttl=60)
    zone.txt("_dmarc.cached.test", "v=DMARC1; p=none")
    clock = Clock()
    dns = auth_dns(server, clock)
    assert await in_thread(dns.txt, "_dmarc.cached.test") == [b"v=DMARC1; p=none"]
    zone.remove("_dmarc.cached.test").txt("_dmarc.cached.test", "v=DMARC1; p=reject")
    clock.now += 59
    assert await in_thread(dns.txt, "_dmarc.cached.test") == [b"v=DMARC1; p=none"]
    clock.now += 2
    assert await in_thread(dns.txt, "_dmarc.cached.test") == [b"v=DMARC1; p=reject"]


@pytest_twisted.ensureDeferred
async def test_no_such_record_is_kept_for_the_negative_ttl(server):
    zone = server.zone("neg.test", ttl=30)
    zone.a("_dmarc.neg.test", "192.0.2.1")  # the name exists: NODATA for TXT, with the SOA
    clock = Clock()
    dns = auth_dns(server, clock)
    assert await in_thread(dns.txt, "_dmarc.neg.test") == []
    zone.txt("_dmarc.neg.test", "v=DMARC1; p=none")
    clock.now += 29
    assert await in_thread(dns.txt, "_dmarc.neg.test") == []
    clock.now += 2
    assert await in_thread(dns.txt, "_dmarc.neg.test") == [b"v=DMARC1; p=none"]


@pytest_twisted.ensureDeferred
async def test_no_such_name_without_a_soa_is_not_kept(server):
    """twisted.names answers NXDOMAIN without the zone's SOA: with no negative TTL
    (RFC 2308 5) the next question goes to the server again."""
    zone = server.zone("nx.test", ttl=30)
    dns = auth_dns(server, Clock())
    assert await in_thread(dns.txt, "_dmarc.nx.test") == []
    zone.txt("_dmarc.nx.test", "v=DMARC1; p=none")
    assert await in_thread(dns.txt, "_dmarc.nx.test") == [b"v=DMARC1; p=none"]


@pytest_twisted.ensureDeferred
async def test_a_failure_is_not_kept(server):
    dns = auth_dns(server, Clock())
    for _ in range(2):
        with pytest.raises(DNSTemporaryError):
            await in_thread(dns.txt, "x.servfail.test")
    assert dns._answers == {}


@pytest_twisted.ensureDeferred
async def test_the_cache_is_bounded(server):
    zone = server.zone("many.test", ttl=300)
    for i in range(6):
        zone.txt(f"n{i}.many.test", f"record {i}")
    clock = Clock()
    dns = auth_dns(server, clock, cache_size=3)
    for i in range(6):
        assert await in_thread(dns.txt, f"n{i}.many.test") == [f"record {i}".encode()]
        assert len(dns._answers) <= 3
    # the newest are the ones kept, and still answer without the server
    zone.remove("n5.many.test")
    assert await in_thread(dns.txt, "n5.many.test") == [b"record 5"]


@pytest_twisted.ensureDeferred
async def test_callers_cannot_change_what_is_kept(server):
    zone = server.zone("own.test", ttl=60)
    zone.txt("own.test", "v=spf1 -all")
    dns = auth_dns(server, Clock())
    first = await in_thread(dns.resolve, "own.test", "TXT")
    first.clear()
    assert await in_thread(dns.txt, "own.test") == [b"v=spf1 -all"]


def test_negative_ttl_of_a_no_such_name_with_its_soa():
    """What real authoritative servers send (RFC 2308 3): the SOA in the authority
    section; kept for min(its TTL, its MINIMUM)."""
    import dns.message
    import dns.name
    import dns.rcode
    import dns.resolver
    import dns.rrset

    from mta.policy.authdns import _negative_ttl

    qname = dns.name.from_text("_dmarc.gone.test")
    query = dns.message.make_query(qname, "TXT")
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority.append(
        dns.rrset.from_text("gone.test.", 300, "IN", "SOA", "ns.gone.test. h.gone.test. 1 2 3 4 45")
    )
    error = dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: response})
    assert _negative_ttl(error) == 45
    assert _negative_ttl(dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: query})) == 0


@pytest_twisted.ensureDeferred
async def test_fresh_until_is_when_the_first_answer_used_expires(server):
    """What a result computed from DNS answers may be reused for: until the first
    of them expires; not at all when one was not kept, or none was used."""
    server.zone("fresh.test", ttl=60).txt("fresh.test", "v=spf1 -all")
    server.zone("short.test", ttl=10).txt("s.short.test", "short")
    server.zone("nosoa.test", ttl=60)
    clock = Clock()
    dns = auth_dns(server, clock)

    def two(first, second):
        return dns.txt(first) + dns.txt(second)

    found, until = await in_thread(dns.fresh_until, two, "fresh.test", "s.short.test")
    assert found == [b"v=spf1 -all", b"short"] and until == pytest.approx(1010, abs=0.5)
    clock.now += 5  # both cached now: the same bound, from the cache
    again = await in_thread(dns.fresh_until, two, "fresh.test", "s.short.test")
    assert again[1] == until
    found, until = await in_thread(dns.fresh_until, dns.txt, "x.nosoa.test")
    assert until == 0  # an answer not kept
    assert (await in_thread(dns.fresh_until, lambda: "no DNS"))[1] == 0

    def failing():
        return dns.txt("x.servfail.test")

    with pytest.raises(DNSTemporaryError):
        await in_thread(dns.fresh_until, failing)
    # nested inside run_cached, from the cache only
    done, (found, until) = dns.run_cached(dns.fresh_until, dns.txt, "fresh.test")
    assert done and found == [b"v=spf1 -all"] and until == pytest.approx(1060, abs=0.5)
