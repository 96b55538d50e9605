"""DKIM key generation for ``mta-admin dkim keygen``: the key file and its DNS record.

A key is ``<datadir>/dkim/<domain>.<selector>.key``: an RSA private key in PKCS#1
PEM (what dkimpy 1.1.4 and OpenDKIM both read), mode 0600, owned like the data
directory so the daemon can read it when root ran the command.  An existing key is
never overwritten: rotating means a new selector, so the old key keeps signing until
the config switches (see `mta.delivery.dkim`).
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mta.db import match_owner
from mta.delivery.dkim import key_path

MIN_BITS = 1024
MAX_BITS = 4096
_TXT_CHUNK = 255  # one DNS character-string


class KeyExists(FileExistsError):
    pass


def generate_key(bits: int = 2048) -> tuple[bytes, str]:
    """(private key PEM, base64 SubjectPublicKeyInfo for the ``p=`` tag)."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"key size must be {MIN_BITS} to {MAX_BITS} bits, got {bits}")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem, public_key_b64(pem)


def public_key_b64(pem: bytes) -> str:
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode("ascii")


def txt_value(public_b64: str) -> str:
    return f"v=DKIM1; k=rsa; p={public_b64}"


def txt_record(domain: str, selector: str, public_b64: str) -> str:
    """A zone-file line; the value is split into 255-octet strings (RFC 1035 3.3.14)."""
    value = txt_value(public_b64)
    chunks = [value[i : i + _TXT_CHUNK] for i in range(0, len(value), _TXT_CHUNK)]
    strings = " ".join(f'"{c}"' for c in chunks)
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def write_key(
    key_dir: str, domain: str, selector: str, pem: bytes, owner_of: str | None = None
) -> str:
    """Write the key (mode 0600, never over an existing one); returns its path."""
    os.makedirs(key_dir, mode=0o700, exist_ok=True)
    path = key_path(key_dir, domain, selector)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyExists(
            f"{path} already exists; to rotate, generate a key with another --selector"
        ) from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    if owner_of is not None:  # root ran us: the daemon (the datadir's owner) must read it
        match_owner(key_dir, owner_of)
        match_owner(path, owner_of)
    return path
