"""Master keys for encryption at rest: the keyring, key ids and key files.

Shared by the mail stores (`mta.storage.crypto`, one AES-256-GCM blob per stored
message) and the spool (`mta.crypto.stream`, queued messages sealed segment by
segment), so one `mta-admin key init|rotate|retire` governs both.  A master key never
encrypts data itself: each message gets a random data key, wrapped under a
key-encryption key derived with HKDF-SHA256 from the master key (`kek`).

A master key's id is derived from the key itself (HKDF, 8 bytes, shown as 16 hex
digits), so a wrong key is told apart from altered data.  Nothing here writes to the
disk: `FileKeyring` only reads key files (`mta.admin.keys` writes them).
"""

from __future__ import annotations

import json
import os
import secrets
import threading

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
ID_SIZE = 8
_ID_SIZE = ID_SIZE

# Argon2id parameters of a new passphrase salt file (the file records its own).
ARGON2_DEFAULTS = {"time_cost": 3, "memory_cost": 65536, "parallelism": 4}


class DecryptionError(Exception):
    """Data that cannot be decrypted: the wrong master key, or altered bytes."""


class KeyringError(Exception):
    """The key files are missing, unreadable or malformed; the message says which."""


def key_id_of(master: bytes) -> str:
    """The id of a master key: 16 hex digits derived from it (not a hash of it)."""
    return hkdf(master, b"mta storage key id v1", _ID_SIZE).hex()


def hkdf(master: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


def kek(master: bytes, key_id: str) -> AESGCM:
    """The key-encryption key of master key `key_id` (wraps data keys)."""
    return AESGCM(hkdf(master, b"mta storage kek v1 " + key_id.encode()))


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
        self._keks: dict[str, AESGCM] = {}

    def kek(self, key_id: str) -> AESGCM:
        """The key-encryption key of master key `key_id` (memoised: HKDF costs more
        than sealing a small message)."""
        aead = self._keks.get(key_id)
        if aead is None:
            aead = self._keks[key_id] = kek(self.keys[key_id], key_id)
        return aead

    @classmethod
    def of(cls, *masters: bytes) -> Keyring:
        """A keyring of these master keys, the first being current."""
        return cls({key_id_of(m): m for m in masters}, key_id_of(masters[0]))

    def refresh(self) -> None:
        """Re-read the keys when they may have changed (a no-op here)."""


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


def open_keyring(config, keyring_class=None) -> FileKeyring:
    """The keyring of ``[storage]``'s key source (``master_key_file`` or
    ``master_key_passphrase_file``), which the stores and the spool share; raises
    KeyringError saying which file is missing or bad."""
    if keyring_class is None:
        keyring_class = FileKeyring
    return keyring_class(
        key_file=config.storage.master_key_file,
        passphrase_file=config.storage.master_key_passphrase_file,
    )
