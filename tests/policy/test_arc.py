"""ARC chain verification (dkimpy) of a message a forwarder sealed; keys in a real DNS
server on loopback."""

from __future__ import annotations

import pytest_twisted

from mta.policy.arc import verify_chain
from tests.policy.authzone import auth_zones, in_thread, message  # noqa: F401


def forwarded(zones) -> bytes:
    """example.test signs; forwarder.test receives it, records its results, tags
    the subject like a mailing list (which breaks the DKIM signature) and seals."""
    original = zones.keys["rsa"].sign(message(subject="hello"))
    original = original.replace(b"Subject: hello", b"Subject: [list] hello")
    results = (
        b"Authentication-Results: mx.forwarder.test; dkim=pass header.d=example.test;"
        b" spf=pass smtp.mailfrom=example.test\r\n"
    )
    return zones.keys["forwarder"].sign(results + original, arc=True, srv_id=b"mx.forwarder.test")


async def verify(zones, data):
    return await in_thread(verify_chain, data, zones.dns())


@pytest_twisted.ensureDeferred
async def test_chain_from_forwarder_passes(auth_zones):  # noqa: F811
    result = await verify(auth_zones, forwarded(auth_zones))
    assert (result.result, result.instances, result.sealer) == ("pass", 1, "forwarder.test")
    from mta.policy.dkimverify import verify_signatures

    (dkim_result,) = await in_thread(verify_signatures, forwarded(auth_zones), auth_zones.dns())
    assert dkim_result.result == "fail"  # what ARC lets the next hop see past


@pytest_twisted.ensureDeferred
async def test_tampered_after_sealing_fails(auth_zones):  # noqa: F811
    data = forwarded(auth_zones).replace(b"this is the body", b"this was the body")
    result = await verify(auth_zones, data)
    assert result.result == "fail"


@pytest_twisted.ensureDeferred
async def test_no_chain_is_none(auth_zones):  # noqa: F811
    result = await verify(auth_zones, auth_zones.keys["rsa"].sign(message()))
    assert (result.result, result.instances) == ("none", 0)


@pytest_twisted.ensureDeferred
async def test_sealer_key_lookup_failure_is_temperror(auth_zones):  # noqa: F811
    from tests.policy.authzone import rsa_key

    key = rsa_key("arc", "relay.servfail.test")
    results = b"Authentication-Results: mx.relay.servfail.test; spf=pass smtp.mailfrom=x.test\r\n"
    data = key.sign(results + message(), arc=True, srv_id=b"mx.relay.servfail.test")
    result = await verify(auth_zones, data)
    assert result.result == "temperror"
