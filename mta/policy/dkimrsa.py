"""RSA signature checks for dkimpy through OpenSSL (the `cryptography` library).

dkimpy verifies RSA signatures in Python (`dkim.crypto.RSASSA_PKCS1_v1_5_verify`:
the signature and modulus converted between bytes and integers byte by byte, then
`pow`).  On a receiving MX with `[checks] dkim` on, that was the largest single cost
of the sender-authentication checks: about 40% of the Python time under load, more
than SPF, DMARC and the SMTP session together.  `install()` replaces the function
dkimpy's DKIM and ARC verification call with one that asks OpenSSL, with the same
contract: (hash object, signature bytes, {"modulus": n, "publicExponent": e}) ->
bool.  Public keys are built once per key (a sender's key serves all its mail).

`install()` also keeps dkimpy's parsed public keys (`dkim.evaluate_pk`: the tag
list and an ASN.1 parse in Python, on every signature) per published record: the
DNS answer is cached already, and the same record always parses the same way.  A
record that does not parse is not kept (dkimpy raises, and raises again).

What OpenSSL would refuse but dkimpy accepts is handed back to dkimpy's own
function: hash algorithms other than SHA-256 and SHA-1, and keys `cryptography`
cannot load.  A signature shorter than the modulus (leading zero bytes dropped by
a careless signer) is padded, as dkimpy's integer arithmetic implicitly does.
"""

from __future__ import annotations

import functools

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_ALGORITHMS = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_python_verify = dkim.crypto.RSASSA_PKCS1_v1_5_verify
_evaluate_pk = dkim.evaluate_pk


@functools.lru_cache(maxsize=4096)
def evaluate_pk(name, record):
    """dkimpy's `evaluate_pk(name, record)`, once per (name, record)."""
    return _evaluate_pk(name, record)


@functools.lru_cache(maxsize=4096)
def _public_key(modulus: int, exponent: int) -> rsa.RSAPublicKey | None:
    try:
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except (ValueError, TypeError):
        return None


def rsa_verify(hash, signature: bytes, public_key: dict) -> bool:
    """dkimpy's `RSASSA_PKCS1_v1_5_verify`, through OpenSSL."""
    algorithm = _ALGORITHMS.get(getattr(hash, "name", "").lower())
    key = _public_key(public_key["modulus"], public_key["publicExponent"])
    if algorithm is None or key is None:
        return _python_verify(hash, signature, public_key)
    size = (key.key_size + 7) // 8
    if len(signature) > size:
        return False
    signature = signature.rjust(size, b"\x00")
    try:
        key.verify(signature, hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except InvalidSignature:
        return False
    return True


def install() -> None:
    """Make dkimpy's DKIM and ARC verification use `rsa_verify` and the kept keys
    (idempotent)."""
    dkim.RSASSA_PKCS1_v1_5_verify = rsa_verify
    dkim.evaluate_pk = evaluate_pk
