"""SPF with pyspf against a real authoritative DNS server on loopback."""

from __future__ import annotations

import pytest
import pytest_twisted
import spf as pyspf

from mta.config import DNSConfig
from mta.dns import make_dnspython_resolver
from mta.policy.authdns import AuthDNS
from mta.policy.spf import check_spf
from tests.dnsserver import blackhole_port
from tests.policy.authzone import CLIENT, HOSTNAME, auth_zones, in_thread  # noqa: F401


async def spf_result(zones, sender, helo="client.helo.test", ip=CLIENT, dns=None):
    return await in_thread(
        check_spf, dns or zones.dns(), ip, sender, helo, receiver=HOSTNAME, querytime=10
    )


@pytest.mark.parametrize(
    "sender, expected",
    [
        ("alice@example.test", "pass"),
        ("alice@fail.test", "fail"),
        ("alice@soft.test", "softfail"),
        ("alice@neutral.test", "neutral"),
        ("alice@none.test", "none"),
        ("alice@perm.test", "permerror"),
        ("alice@many.test", "permerror"),  # 11 DNS mechanisms: more than 10
        ("alice@temp.test", "temperror"),  # its include is REFUSED by the server
    ],
)
@pytest_twisted.ensureDeferred
async def test_spf_results(auth_zones, sender, expected):  # noqa: F811
    result = await spf_result(auth_zones, sender)
    assert result.result == expected, result
    assert result.identity == "mailfrom"
    assert result.domain == sender.partition("@")[2]
    header = result.received_spf
    assert header.startswith(b"Received-SPF: ") and header.endswith(b"\r\n")
    assert expected.replace("error", "").lower() in header.lower().split(b"(")[0].decode()
    assert b"client-ip=127.0.0.1" in header.replace(b"\r\n\t", b" ")


@pytest_twisted.ensureDeferred
async def test_too_many_lookups_is_named(auth_zones):  # noqa: F811
    result = await spf_result(auth_zones, "alice@many.test")
    assert "lookups" in result.explanation.lower()


@pytest_twisted.ensureDeferred
async def test_null_sender_checks_the_helo_identity(auth_zones):  # noqa: F811
    result = await spf_result(auth_zones, "", helo="helo.test")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "helo.test")
    result = await spf_result(auth_zones, "", helo="helo.test", ip="192.0.2.77")
    assert (result.result, result.identity) == ("fail", "helo")


@pytest_twisted.ensureDeferred
async def test_dns_down_is_temperror():
    sock, port = blackhole_port()
    try:
        dns = AuthDNS(make_dnspython_resolver(DNSConfig((f"127.0.0.1:{port}",), 0.5)))
        result = await spf_result(None, "alice@example.test", dns=dns)
    finally:
        sock.close()
    assert result.result == "temperror"
    assert "timeout" in result.explanation


@pytest_twisted.ensureDeferred
async def test_lookup_is_per_thread_and_leaves_pyspf_default(auth_zones):  # noqa: F811
    """Our resolver is used only inside check_spf: pyspf's global lookup, called
    outside it, still goes to pyspf's own resolver."""
    await spf_result(auth_zones, "alice@example.test")
    dispatcher = pyspf.DNSLookup
    from mta.policy import spf as ours

    assert getattr(ours._local, "lookup", None) is None
    assert dispatcher.__name__ == "dispatch"
