"""Encryption at rest: the blob format of an encrypted message and the keyring.

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

A master key's id is derived from the key itself (HKDF, 8 bytes, shown as 16 hex
digits), so the wrong key is told apart from an altered message: a blob whose key
id is not in the keyring, or whose data key does not unwrap, raises
`DecryptionError` ("wrong master key for key id X"); one whose ciphertext does not
authenticate raises "message was altered".  Nothing here touches the disk except
`FileKeyring`, which only reads key files (`mta.admin.keys` writes them).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MTAENC"
VERSION = 1
KEY_SIZE = 32
_ID_SIZE = 8
_NONCE = 12
_WRAPPED = KEY_SIZE + 16
_FIXED = len(MAGIC) + 1 + _ID_SIZE + _NONCE + _WRAPPED + _NONCE + 2
# Bytes a blob adds to the message, besides the message tag.
OVERHEAD = _FIXED + 16
_KEY_ID_AT = len(MAGIC) + 1
_WRAP_AT = _KEY_ID_AT + _ID_SIZE

# Argon2id parameters of a new passphrase salt file (the file records its own).
ARGON2_DEFAULTS = {"time_cost": 3, "memory_cost": 65536, "parallelism": 4}


class DecryptionError(Exception):
    """A blob that cannot be decrypted: the wrong master key, or an altered message."""


class KeyringError(Exception):
    """The key files are missing, unreadable or malformed; the message says which."""


def key_id_of(master: bytes) -> str:
    """The id of a master key: 16 hex digits derived from it (not a hash of it)."""
    return _hkdf(master, b"mta storage key id v1", _ID_SIZE).hex()


def _hkdf(master: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def _kek(master: bytes, key_id: str) -> AESGCM:
    return AESGCM(_hkdf(master, b"mta storage kek v1 " + key_id.encode()))


def _identity(mailbox, message_tag: str) -> bytes:
    box = f"{mailbox.local}@{mailbox.domain}".encode("utf-8", "surrogateescape")
    return MAGIC + bytes([VERSION]) + message_tag.encode() + b"\x00" + box


class Keyring:
    """Master keys by id; `current` is the one new messages are encrypted under."""

    def __init__(self, keys: dict[str, bytes], current: str):
        if current not in keys:
            raise KeyringError(f"the current key {current} is not in the keyring")
        for key_id, key in keys.items():
            if len(key) != KEY_SIZE:
                raise KeyringError(f"key {key_id} is {len(key)} bytes, not {KEY_SIZE}")
        self.keys = dict(keys)
        self.current = current

    @classmethod
    def of(cls, *masters: bytes) -> Keyring:
        """A keyring of these master keys, the first being current."""
        return cls({key_id_of(m): m for m in masters}, key_id_of(masters[0]))

    def refresh(self) -> None:
        """Re-read the keys when they may have changed (a no-op here)."""


def encrypt(keyring: Keyring, mailbox, message_tag: str, data: bytes) -> bytes:
    """The blob of `data` for (`mailbox`, `message_tag`) under the current key."""
    key_id = keyring.current
    dek = AESGCM.generate_key(bit_length=256)
    wrap_nonce, nonce = os.urandom(_NONCE), os.urandom(_NONCE)
    head = MAGIC + bytes([VERSION]) + bytes.fromhex(key_id)
    wrapped = _kek(keyring.keys[key_id], key_id).encrypt(wrap_nonce, dek, head)
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
        return _kek(master, key_id).decrypt(wrap_nonce, wrapped, head)
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
    new_wrapped = _kek(keyring.keys[new_id], new_id).encrypt(new_nonce, dek, head)
    return head + new_nonce + new_wrapped + blob[_WRAP_AT + _NONCE + _WRAPPED :]


# -- key files ---------------------------------------------------------------------


def new_salt(**params: int) -> dict:
    """A passphrase salt file's contents: a random salt and the Argon2id parameters."""
    return {"salt": secrets.token_hex(16), **ARGON2_DEFAULTS, **params}


def passphrase_key(passphrase: bytes, salt: dict) -> bytes:
    """The master key Argon2id derives from `passphrase` with a salt file's contents."""
    from argon2.low_level import Type, hash_secret_raw

    return hash_secret_raw(
        passphrase.strip(),
        bytes.fromhex(salt["salt"]),
        time_cost=int(salt["time_cost"]),
        memory_cost=int(salt["memory_cost"]),
        parallelism=int(salt["parallelism"]),
        hash_len=KEY_SIZE,
        type=Type.ID,
    )


def read_salt(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            salt = json.load(f)
        bytes.fromhex(salt["salt"])
        for k in ARGON2_DEFAULTS:
            int(salt[k])
        return salt
    except OSError as e:
        raise KeyringError(f"{path}: cannot read the passphrase salt: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise KeyringError(f"{path}: not a passphrase salt file") from None


def _read_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read(KEY_SIZE + 1)
    except OSError as e:
        raise KeyringError(f"{path}: cannot read the master key: {e.strerror}") from None
    if len(key) != KEY_SIZE:
        raise KeyringError(f"{path}: a master key file holds exactly {KEY_SIZE} bytes")
    return key


class FileKeyring(Keyring):
    """The keyring in files (see README.rst, "Encryption at rest").

    With `key_file`: the current master key is that file (32 raw bytes); older keys
    are ``<id>.key`` beside it.  With `passphrase_file`: the current key is derived
    with Argon2id from the passphrase and ``<passphrase_file>.salt`` (JSON: salt and
    parameters); older keys are the same passphrase with the salts ``<id>.salt`` in
    the passphrase file's directory.  `refresh` re-reads the files when that
    directory or the current file changed, so a running server follows `key rotate`.
    """

    def __init__(self, key_file: str = "", passphrase_file: str = ""):
        if bool(key_file) == bool(passphrase_file):
            raise KeyringError("give exactly one of a master key file and a passphrase file")
        self.key_file = key_file
        self.passphrase_file = passphrase_file
        self.directory = os.path.dirname(os.path.abspath(key_file or passphrase_file))
        self._seen = None
        self._lock = threading.Lock()
        self._derived: dict[str, bytes] = {}
        self.keys, self.current = {}, ""
        self.refresh()

    @property
    def current_file(self) -> str:
        return self.key_file or self.passphrase_file + ".salt"

    def _signature(self):
        stats = []
        for path in (self.directory, self.current_file):
            try:
                st = os.stat(path)
                stats.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                stats.append(None)
        return tuple(stats)

    def refresh(self) -> None:
        with self._lock:  # delivery threads share one keyring
            seen = self._signature()
            if seen == self._seen:
                return
            keys, current = self._load()
            Keyring.__init__(self, keys, current)
            self._seen = seen

    def _load(self) -> tuple[dict[str, bytes], str]:
        suffix = ".key" if self.key_file else ".salt"
        if self.key_file:
            current = _read_key(self.key_file)  # first: its error names the file
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as e:
            raise KeyringError(f"{self.directory}: cannot list the keys: {e.strerror}") from None
        old = [
            n
            for n in names
            if n.endswith(suffix) and _is_key_id(n[: -len(suffix)])
            and os.path.join(self.directory, n) != os.path.abspath(self.current_file)
        ]  # fmt: skip
        if self.key_file:
            keys = {n[:-4]: _read_key(os.path.join(self.directory, n)) for n in old}
        else:
            try:
                with open(self.passphrase_file, "rb") as f:
                    passphrase = f.read()
            except OSError as e:
                raise KeyringError(
                    f"{self.passphrase_file}: cannot read the passphrase: {e.strerror}"
                ) from None
            if not passphrase.strip():
                raise KeyringError(f"{self.passphrase_file}: the passphrase is empty")
            current = self._derive(passphrase, read_salt(self.current_file))
            keys = {
                n[:-5]: self._derive(passphrase, read_salt(os.path.join(self.directory, n)))
                for n in old
            }
        current_id = key_id_of(current)
        for key_id, key in keys.items():
            if key_id_of(key) != key_id:
                raise KeyringError(
                    f"{self.directory}/{key_id}{suffix}: holds the key of id {key_id_of(key)}"
                    f" (a key file is named after its key's id)"
                )
        keys[current_id] = current
        return keys, current_id

    def _derive(self, passphrase: bytes, salt: dict) -> bytes:
        memo = (passphrase, json.dumps(salt, sort_keys=True))
        key = self._derived.get(memo)
        if key is None:
            key = self._derived[memo] = passphrase_key(passphrase, salt)
        return key


def _is_key_id(text: str) -> bool:
    return len(text) == 2 * _ID_SIZE and all(c in "0123456789abcdef" for c in text)
