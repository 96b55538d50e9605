"""Encryption at rest in the mail stores: the blob format of one stored message.

A blob (version 1) is, byte for byte::

    b"MTAENC" | 0x01 | key id (8) | wrap nonce (12) | wrapped data key (48)
              | nonce (12) | tag length (2, big endian) | message tag (UTF-8)
              | ciphertext + GCM tag (16)

Each message gets a random 256-bit data key; the message is sealed with AES-256-GCM
under it.  The data key is sealed ("wrapped") with AES-256-GCM under a key-encryption
key derived with HKDF-SHA256 from the master key (info ``mta storage kek v1 <key
id>``); the wrap's authenticated data is the magic, version and key id.  The
message's authenticated data is the magic, version, message tag and the mailbox
(``local@domain``), so a blob moved to another mailbox, or given another tag, fails
to decrypt.  The key id is not in the message's authenticated data, so retiring a
key re-wraps the data key (`rewrap`) without touching the ciphertext.

The keyring (master keys, key ids, key files) is `mta.crypto.keys`, shared with the
spool.  A blob whose key id is not in the keyring, or whose data key does not
unwrap, raises `DecryptionError` ("wrong master key for key id X"); one whose
ciphertext does not authenticate raises "message was altered".  Nothing here
touches the disk.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mta.crypto.keys import (  # noqa: F401 (the keyring names storage callers use)
    ARGON2_DEFAULTS,
    KEY_SIZE,
    DecryptionError,
    FileKeyring,
    Keyring,
    KeyringError,
    key_id_of,
    new_salt,
    passphrase_key,
    read_salt,
)

MAGIC = b"MTAENC"
VERSION = 1
_ID_SIZE = 8
_NONCE = 12
_WRAPPED = KEY_SIZE + 16
_FIXED = len(MAGIC) + 1 + _ID_SIZE + _NONCE + _WRAPPED + _NONCE + 2
# Bytes a blob adds to the message, besides the message tag.
OVERHEAD = _FIXED + 16
_KEY_ID_AT = len(MAGIC) + 1
_WRAP_AT = _KEY_ID_AT + _ID_SIZE


def _identity(mailbox, message_tag: str) -> bytes:
    box = f"{mailbox.local}@{mailbox.domain}".encode("utf-8", "surrogateescape")
    return MAGIC + bytes([VERSION]) + message_tag.encode() + b"\x00" + box


def encrypt(keyring: Keyring, mailbox, message_tag: str, data: bytes) -> bytes:
    """The blob of `data` for (`mailbox`, `message_tag`) under the current key."""
    key_id = keyring.current
    dek = AESGCM.generate_key(bit_length=256)
    wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
    head = MAGIC + bytes([VERSION]) + bytes.fromhex(key_id)
    wrapped = keyring.kek(key_id).encrypt(wrap_nonce, dek, head)
    tag = message_tag.encode()
    sealed = AESGCM(dek).encrypt(nonce, data, _identity(mailbox, message_tag))
    return b"".join([head, wrap_nonce, wrapped, nonce, struct.pack(">H", len(tag)), tag, sealed])


def _parse(blob: bytes):
    if len(blob) < _FIXED + 16 or blob[: len(MAGIC)] != MAGIC:
        raise DecryptionError("not an encrypted message (or a truncated one)")
    if blob[len(MAGIC)] != VERSION:
        raise DecryptionError(f"unknown encrypted message version {blob[len(MAGIC)]}")
    key_id = blob[_KEY_ID_AT:_WRAP_AT].hex()
    wrap_nonce = blob[_WRAP_AT : _WRAP_AT + _NONCE]
    wrapped = blob[_WRAP_AT + _NONCE : _WRAP_AT + _NONCE + _WRAPPED]
    nonce = blob[_FIXED - 2 - _NONCE : _FIXED - 2]
    (tag_len,) = struct.unpack(">H", blob[_FIXED - 2 : _FIXED])
    try:
        tag = blob[_FIXED : _FIXED + tag_len].decode()
    except UnicodeDecodeError:
        raise DecryptionError("message was altered (its tag is not text)") from None
    return key_id, wrap_nonce, wrapped, nonce, tag, blob[_FIXED + tag_len :]


def blob_key_id(blob: bytes) -> str:
    """The id of the master key a blob's data key is wrapped under."""
    return _parse(blob)[0]


def blob_tag(blob: bytes) -> str:
    """The message tag recorded (and authenticated) in a blob."""
    return _parse(blob)[4]


def _unwrap(keyring: Keyring, key_id: str, wrap_nonce: bytes, wrapped: bytes) -> bytes:
    master = keyring.keys.get(key_id)
    if master is None:
        raise DecryptionError(f"wrong master key for key id {key_id}: no such key in the keyring")
    head = MAGIC + bytes([VERSION]) + bytes.fromhex(key_id)
    try:
        return keyring.kek(key_id).decrypt(wrap_nonce, wrapped, head)
    except InvalidTag:
        raise DecryptionError(
            f"wrong master key for key id {key_id} (or its wrapped data key was altered)"
        ) from None


def decrypt(keyring: Keyring, mailbox, blob: bytes) -> tuple[str, bytes]:
    """(message tag, clear text) of a blob stored in `mailbox`; raises DecryptionError."""
    key_id, wrap_nonce, wrapped, nonce, tag, sealed = _parse(blob)
    dek = _unwrap(keyring, key_id, wrap_nonce, wrapped)
    try:
        return tag, AESGCM(dek).decrypt(nonce, sealed, _identity(mailbox, tag))
    except InvalidTag:
        raise DecryptionError(
            f"message was altered (or moved from another mailbox): tag {tag!r}, key id {key_id}"
        ) from None


def rewrap(keyring: Keyring, blob: bytes) -> bytes:
    """The same blob with its data key wrapped under the current key instead."""
    key_id, wrap_nonce, wrapped, *_ = _parse(blob)
    dek = _unwrap(keyring, key_id, wrap_nonce, wrapped)
    new_id = keyring.current
    head = MAGIC + bytes([VERSION]) + bytes.fromhex(new_id)
    new_nonce = os.urandom(_NONCE)
    new_wrapped = keyring.kek(new_id).encrypt(new_nonce, dek, head)
    return head + new_nonce + new_wrapped + blob[_WRAP_AT + _NONCE + _WRAPPED :]
