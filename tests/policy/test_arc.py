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


# -- sealing what we forward ([checks] arc_seal, with the [dkim] key) ---------------


async def sealed(zones, tmp_path, data, key_name, host, *, arc_seal=True):
    """What the outbound relay prepends to `data` (a message as our queue holds it)
    when it forwards it, with `key_name`'s key as our [dkim] key."""
    from types import SimpleNamespace

    from twisted.internet import reactor

    from mta.config import DKIMConfig
    from mta.delivery.dkim import DKIMSigner, key_path
    from mta.envelope import Address
    from mta.testing import MemoryBody

    key = zones.keys[key_name]
    path = key_path(str(tmp_path), key.domain, key.selector)
    with open(path, "wb") as f:
        f.write(key.private)
    signer = DKIMSigner(
        DKIMConfig(key.selector, (key.domain,)),
        str(tmp_path),
        reactor.getThreadPool(),
        reactor,
        seal_as=host if arc_seal else "",
    )
    job = SimpleNamespace(
        envelope=SimpleNamespace(sender=Address("list", "lists.test")), body=MemoryBody(data)
    )
    return await signer.sign_job(job)


@pytest_twisted.ensureDeferred
async def test_we_seal_what_we_forward(auth_zones, tmp_path):  # noqa: F811
    from mta.policy.authresults import authentication_results
    from mta.policy.dkimverify import DKIMResult

    host = "mx.forwarder.test"
    ours = authentication_results(host, dkim=(DKIMResult("pass", "example.test", "sel"),))
    received = (
        b"Received: from client.test by mx.forwarder.test; Fri, 4 Dec 2026 12:00:00 +0000\r\n"
    )
    data = ours + received + auth_zones.keys["rsa"].sign(message())
    arc_set = await sealed(auth_zones, tmp_path, data, "forwarder", host)
    assert arc_set.startswith(b"ARC-Seal: i=1;") and b"ARC-Message-Signature: i=1;" in arc_set
    result = await verify(auth_zones, arc_set + data)
    assert (result.result, result.instances, result.sealer) == ("pass", 1, "forwarder.test")
    # off, or nothing of ours to vouch for (mail that did not come from outside)
    assert await sealed(auth_zones, tmp_path, data, "forwarder", host, arc_seal=False) == b""
    assert await sealed(auth_zones, tmp_path, data, "forwarder", "mx.elsewhere.test") == b""


@pytest_twisted.ensureDeferred
async def test_we_extend_a_chain(auth_zones, tmp_path):  # noqa: F811
    """A message a forwarder sealed comes in (arc=pass in our results) and we
    forward it again: the chain has two sets and verifies."""
    from mta.policy.arc import ARCResult
    from mta.policy.authresults import authentication_results

    host = "mx.other-org.test"
    first = forwarded(auth_zones)
    chain = await verify(auth_zones, first)
    assert chain == ARCResult("pass", 1, "forwarder.test", chain.reason)
    data = authentication_results(host, dkim=(), arc=chain) + first
    arc_set = await sealed(auth_zones, tmp_path, data, "other", host)
    assert arc_set.startswith(b"ARC-Seal: i=2;")
    result = await verify(auth_zones, arc_set + data)
    assert (result.result, result.instances, result.sealer) == ("pass", 2, "other-org.test")
