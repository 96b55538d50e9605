"""The OpenSSL RSA check dkimpy is given (`mta.policy.dkimrsa`) answers exactly as
dkimpy's own Python one, for good and bad signatures, both hashes, odd lengths."""

from __future__ import annotations

import hashlib

import dkim
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mta.policy import dkimrsa

python_verify = dkimrsa._python_verify


@pytest.fixture(scope="module", params=[1024, 2048])
def key(request):
    return rsa.generate_private_key(public_exponent=65537, key_size=request.param)


def numbers(key) -> dict:
    n = key.public_key().public_numbers()
    return {"modulus": n.n, "publicExponent": n.e}


@pytest.mark.parametrize("name", ["sha256", "sha1"])
def test_agrees_with_dkimpy_on_good_and_bad_signatures(key, name):
    data = b"the canonicalized header fields"
    algorithm = hashes.SHA256() if name == "sha256" else hashes.SHA1()
    signature = key.sign(data, padding.PKCS1v15(), algorithm)
    pk = numbers(key)
    for sig, text, expected in (
        (signature, data, True),
        (signature, data + b"!", False),  # another digest
        (signature[:-1] + bytes([signature[-1] ^ 1]), data, False),  # altered signature
        (signature + b"\x00", data, False),  # longer than the modulus
        (b"", data, False),
    ):
        ours = dkimrsa.rsa_verify(hashlib.new(name, text), sig, pk)
        theirs = python_verify(hashlib.new(name, text), sig, pk)
        assert ours is theirs is expected


def test_a_signature_missing_its_leading_zero_bytes_is_padded(key):
    data = b"x"
    for i in range(2000):  # find a signature whose first byte is zero
        signature = key.sign(data + str(i).encode(), padding.PKCS1v15(), hashes.SHA256())
        if signature[0] == 0:
            text = data + str(i).encode()
            break
    else:
        pytest.skip("no signature with a leading zero byte in 2000 tries")
    short = signature.lstrip(b"\x00")
    pk = numbers(key)
    assert python_verify(hashlib.sha256(text), short, pk) is True
    assert dkimrsa.rsa_verify(hashlib.sha256(text), short, pk) is True


def test_other_hashes_go_to_dkimpy(key, monkeypatch):
    asked = []
    monkeypatch.setattr(dkimrsa, "_python_verify", lambda *a: asked.append(a) or False)
    assert dkimrsa.rsa_verify(hashlib.sha512(b"x"), b"sig", numbers(key)) is False
    assert len(asked) == 1


def test_installed_into_dkimpy():
    import mta.policy.dkimverify  # noqa: F401 (installs it)

    assert dkim.RSASSA_PKCS1_v1_5_verify is dkimrsa.rsa_verify
    assert dkim.evaluate_pk is dkimrsa.evaluate_pk


def test_parsed_keys_are_kept_per_record_and_bad_ones_are_not(key):
    import base64

    from cryptography.hazmat.primitives import serialization

    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    first = dkimrsa.evaluate_pk(b"s._domainkey.a.test", record)
    assert first == dkimrsa._evaluate_pk(b"s._domainkey.a.test", record)
    assert dkimrsa.evaluate_pk(b"s._domainkey.a.test", record) is first
    assert first[0]["modulus"] == key.public_key().public_numbers().n
    for _ in range(2):  # raised every time, never kept as an answer
        with pytest.raises(dkim.KeyFormatError):
            dkimrsa.evaluate_pk(b"s._domainkey.a.test", b"v=DKIM1; k=rsa; p=bm90IGEga2V5")
