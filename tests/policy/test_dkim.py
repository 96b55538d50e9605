"""DKIM verification of every signature (dkimpy), keys in a real DNS server on
loopback; messages signed by dkimpy (RSA and Ed25519) and by OpenDKIM."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import utils

from mta.policy.dkimverify import verify_signatures
from tests.conftest import require_tool
from tests.policy.authzone import auth_zones, in_thread, message, rsa_key  # noqa: F401


async def verify(zones, data):
    return await in_thread(verify_signatures, data, zones.dns())


@pytest_twisted.ensureDeferred
async def test_rsa_signature_passes(auth_zones):  # noqa: F811
    (result,) = await verify(auth_zones, auth_zones.keys["rsa"].sign(message()))
    assert (result.result, result.domain, result.selector) == ("pass", "example.test", "sel")
    assert result.algorithm == "rsa-sha256" and result.b


@pytest_twisted.ensureDeferred
async def test_ed25519_signature_passes(auth_zones):  # noqa: F811
    (result,) = await verify(auth_zones, auth_zones.keys["ed"].sign(message()))
    assert (result.result, result.selector, result.algorithm) == ("pass", "ed", "ed25519-sha256")


@pytest_twisted.ensureDeferred
async def test_bad_body_hash_fails(auth_zones):  # noqa: F811
    signed = auth_zones.keys["rsa"].sign(message())
    (result,) = await verify(auth_zones, signed.replace(b"this is the body", b"this is a body"))
    assert result.result == "fail"
    assert "body hash" in result.reason


@pytest_twisted.ensureDeferred
async def test_bad_signature_fails(auth_zones):  # noqa: F811
    signed = auth_zones.keys["rsa"].sign(message(subject="hello"))
    (result,) = await verify(auth_zones, signed.replace(b"Subject: hello", b"Subject: HELLO"))
    assert result.result == "fail"
    assert "body hash" not in result.reason
    (result,) = await verify(
        auth_zones,
        auth_zones.keys["ed"].sign(message()).replace(b"To: bob@", b"To: eve@"),
    )
    assert result.result == "fail"


@pytest_twisted.ensureDeferred
async def test_missing_key_is_permerror(auth_zones):  # noqa: F811
    (result,) = await verify(auth_zones, auth_zones.keys["unpublished"].sign(message()))
    assert (result.result, result.selector) == ("permerror", "gone")
    assert "no key" in result.reason


@pytest_twisted.ensureDeferred
async def test_key_lookup_failure_is_temperror(auth_zones):  # noqa: F811
    key = rsa_key("sel", "mail.servfail.test")
    (result,) = await verify(auth_zones, key.sign(message()))
    assert result.result == "temperror"


@pytest_twisted.ensureDeferred
async def test_every_signature_is_verified(auth_zones):  # noqa: F811
    keys = auth_zones.keys
    once = keys["unpublished"].sign(message())
    twice = keys["ed"].sign(once)
    thrice = keys["rsa"].sign(twice)
    results = await verify(auth_zones, thrice)
    assert [(r.result, r.selector) for r in results] == [
        ("pass", "sel"),
        ("pass", "ed"),
        ("permerror", "gone"),
    ]


@pytest_twisted.ensureDeferred
async def test_unsigned_message_has_no_results(auth_zones):  # noqa: F811
    assert await verify(auth_zones, message()) == ()


@pytest_twisted.ensureDeferred
async def test_message_signed_by_opendkim(auth_zones, tmp_path):  # noqa: F811
    """An independent signer: libopendkim's opendkim-testmsg (CRLF input, -C)."""
    testmsg = require_tool("opendkim-testmsg")
    key = auth_zones.keys["rsa"]
    key_path = tmp_path / "sel.private"
    key_path.write_bytes(key.private)
    key_path.chmod(0o600)
    out, err, code = await utils.getProcessOutputAndValue(
        testmsg,
        ["-C", "-d", "example.test", "-s", "sel", "-k", str(key_path)],
        env={},
        stdinBytes=message(),
    )
    assert code == 0, err
    assert out.startswith(b"DKIM-Signature:"), out[:200]
    signed = out if b"\r\n" in out else out.replace(b"\n", b"\r\n")
    (result,) = await verify(auth_zones, signed)
    assert (result.result, result.domain) == ("pass", "example.test"), result
    (result,) = await verify(auth_zones, signed.replace(b"Hello Bob", b"Hello Eve"))
    assert result.result == "fail"
