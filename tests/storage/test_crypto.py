"""Encryption at rest: the blob format, the keyring files, `EncryptingStore` and the
`[storage] encrypt` config (the contract suite runs the store over maildir and
timeseries too)."""

from __future__ import annotations

import json
import os

import pytest

from mta.config import ConfigError, build_config
from mta.envelope import Address
from mta.storage import StoreItem, crypto, open_store
from mta.storage.crypto import DecryptionError, FileKeyring, Keyring, KeyringError
from mta.storage.encrypted import EncryptingStore
from mta.storage.maildir import MaildirStore
from mta.testing import MemoryBody

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")
K1, K2 = bytes(range(32)), bytes(range(1, 33))
MESSAGE = b"Subject: the secret plan\r\n\r\nMeet at the old mill at dawn.\r\n" * 3
FAST = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}


def test_round_trip():
    ring = Keyring.of(K1)
    blob = crypto.encrypt(ring, BOB, "00aa-0", MESSAGE)
    assert MESSAGE not in blob and b"secret" not in blob
    assert len(blob) == len(MESSAGE) + crypto.OVERHEAD + len("00aa-0")
    assert crypto.decrypt(ring, BOB, blob) == ("00aa-0", MESSAGE)
    assert crypto.blob_key_id(blob) == ring.current == crypto.key_id_of(K1)
    assert crypto.decrypt(ring, BOB, crypto.encrypt(ring, BOB, "t", b"")) == ("t", b"")
    # a fresh data key and nonce each time
    assert crypto.encrypt(ring, BOB, "00aa-0", MESSAGE) != blob


def test_wrong_key_is_named():
    blob = crypto.encrypt(Keyring.of(K1), BOB, "00aa-0", MESSAGE)
    with pytest.raises(
        DecryptionError, match=f"wrong master key for key id {crypto.key_id_of(K1)}"
    ):
        crypto.decrypt(Keyring.of(K2), BOB, blob)
    # the same id with other key bytes (a key file replaced by hand)
    forged = Keyring({crypto.key_id_of(K1): K2}, crypto.key_id_of(K1))
    with pytest.raises(DecryptionError, match="wrong master key for key id"):
        crypto.decrypt(forged, BOB, blob)


@pytest.mark.parametrize(
    "where,expect",
    [
        (lambda blob: len(blob) - 1, "message was altered"),  # the GCM tag
        (lambda blob: len(blob) - 30, "message was altered"),  # the ciphertext
        (lambda blob: crypto._FIXED - 3, "message was altered"),  # the message nonce
        (lambda blob: crypto._FIXED + 1, "message was altered"),  # the message tag (AAD)
        (lambda blob: crypto._WRAP_AT + 1, "wrong master key"),  # the wrap nonce
        (lambda blob: crypto._WRAP_AT + 20, "wrong master key"),  # the wrapped data key
        (lambda blob: crypto._KEY_ID_AT, "wrong master key"),  # the key id
        (lambda blob: 0, "not an encrypted message"),
        (lambda blob: len(crypto.MAGIC), "unknown encrypted message version"),
    ],
)
def test_any_altered_byte_is_refused(where, expect):
    ring = Keyring.of(K1)
    blob = bytearray(crypto.encrypt(ring, BOB, "00aa-0", MESSAGE))
    blob[where(blob)] ^= 0x01
    with pytest.raises(DecryptionError, match=expect):
        crypto.decrypt(ring, BOB, bytes(blob))


def test_truncated_blob_is_refused():
    ring = Keyring.of(K1)
    blob = crypto.encrypt(ring, BOB, "00aa-0", MESSAGE)
    for cut in (0, 10, crypto._FIXED, len(blob) - 1):
        with pytest.raises(DecryptionError):
            crypto.decrypt(ring, BOB, blob[:cut])


def test_blobs_are_bound_to_their_mailbox():
    ring = Keyring.of(K1)
    blob = crypto.encrypt(ring, BOB, "00aa-0", MESSAGE)
    with pytest.raises(DecryptionError, match="moved from another mailbox"):
        crypto.decrypt(ring, CAROL, blob)
    with pytest.raises(DecryptionError):
        crypto.decrypt(ring, Address("Bob", "example.test"), blob)


def test_swapped_data_keys_are_refused():
    ring = Keyring.of(K1)
    a = crypto.encrypt(ring, BOB, "00aa-0", b"one")
    b = crypto.encrypt(ring, BOB, "00aa-1", b"two")
    cut = crypto._WRAP_AT + crypto._NONCE + crypto._WRAPPED
    with pytest.raises(DecryptionError, match="message was altered"):
        crypto.decrypt(ring, BOB, a[:cut] + b[cut:])


def test_swapped_files_in_one_mailbox_are_refused(tmp_path):
    store = EncryptingStore(MaildirStore(str(tmp_path), "mx.example.test"), Keyring.of(K1))
    store.deliver_batch([StoreItem(BOB, f"00aa-{i}", b"", MemoryBody(b"m%d" % i)) for i in (0, 1)])
    a, b = store.list_messages(BOB)
    box = store.mailbox_path(BOB)
    path_a, path_b = (os.path.join(box, m.message_id) for m in (a, b))
    data_a, data_b = open(path_a, "rb").read(), open(path_b, "rb").read()
    open(path_a, "wb").write(data_b)
    open(path_b, "wb").write(data_a)
    for m in (a, b):
        with pytest.raises(DecryptionError, match="holds the message of tag"):
            store.read_message(BOB, m.message_id)


def test_rotation_keeps_old_messages_readable_and_rewrap():
    old = Keyring.of(K1)
    blob = crypto.encrypt(old, BOB, "00aa-0", MESSAGE)
    rotated = Keyring.of(K2, K1)
    assert crypto.decrypt(rotated, BOB, blob)[1] == MESSAGE
    new_blob = crypto.encrypt(rotated, BOB, "00aa-1", MESSAGE)
    assert crypto.blob_key_id(new_blob) == crypto.key_id_of(K2)
    rewrapped = crypto.rewrap(rotated, blob)
    assert crypto.blob_key_id(rewrapped) == crypto.key_id_of(K2)
    assert rewrapped[-len(MESSAGE) :] == blob[-len(MESSAGE) :]  # the ciphertext stays
    assert crypto.decrypt(Keyring.of(K2), BOB, rewrapped)[1] == MESSAGE
    with pytest.raises(DecryptionError, match="wrong master key"):
        crypto.decrypt(Keyring.of(K2), BOB, blob)


def test_passphrase_derivation():
    salt = crypto.new_salt(**FAST)
    key = crypto.passphrase_key(b"correct horse\n", salt)
    assert len(key) == 32
    assert crypto.passphrase_key(b"correct horse", salt) == key  # trailing newline ignored
    assert crypto.passphrase_key(b"wrong horse", salt) != key
    assert crypto.passphrase_key(b"correct horse", crypto.new_salt(**FAST)) != key
    blob = crypto.encrypt(Keyring.of(key), BOB, "t", MESSAGE)
    other = crypto.passphrase_key(b"wrong horse", salt)
    with pytest.raises(DecryptionError, match="wrong master key"):
        crypto.decrypt(Keyring.of(other), BOB, blob)


def test_file_keyring_from_key_files(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "master.key").write_bytes(K2)
    (keys / f"{crypto.key_id_of(K1)}.key").write_bytes(K1)
    ring = FileKeyring(key_file=str(keys / "master.key"))
    assert ring.current == crypto.key_id_of(K2)
    assert set(ring.keys) == {crypto.key_id_of(K1), crypto.key_id_of(K2)}
    (keys / "master.key").write_bytes(K1 + b"x")
    os.utime(keys / "master.key", ns=(1, 1))
    with pytest.raises(KeyringError, match="exactly 32 bytes"):
        ring.refresh()
    (keys / "master.key").write_bytes(K2)
    (keys / f"{crypto.key_id_of(K2)}.key").write_bytes(K1)  # misnamed
    with pytest.raises(KeyringError, match="named after its key's id"):
        FileKeyring(key_file=str(keys / "master.key"))
    with pytest.raises(KeyringError, match="cannot read the master key"):
        FileKeyring(key_file=str(tmp_path / "absent" / "master.key"))


def test_file_keyring_from_a_passphrase(tmp_path):
    (tmp_path / "pass").write_bytes(b"correct horse\n")
    salt = crypto.new_salt(**FAST)
    (tmp_path / "pass.salt").write_text(json.dumps(salt))
    ring = FileKeyring(passphrase_file=str(tmp_path / "pass"))
    assert ring.keys[ring.current] == crypto.passphrase_key(b"correct horse", salt)
    (tmp_path / "pass.salt").write_text("{}")
    with pytest.raises(KeyringError, match="not a passphrase salt file"):
        FileKeyring(passphrase_file=str(tmp_path / "pass"))


# -- open_store and [storage] encrypt ------------------------------------------------


def _config(tmp_path, **storage):
    return build_config(
        {
            "datadir": str(tmp_path / "data"),
            "local_domains": ["example.test"],
            "postmaster": "bob@example.test",
            "storage": storage,
        },
        source=str(tmp_path / "mta.toml"),
    )


@pytest.mark.parametrize("backend", ["maildir", "timeseries"])
def test_no_clear_text_reaches_the_data_dir(tmp_path, backend):
    config = _config(tmp_path, backend=backend, encrypt=True, master_key_file="keys/master.key")
    os.makedirs(config.path("keys"))
    with open(config.path("keys", "master.key"), "wb") as f:
        f.write(K1)
    store = open_store(config)
    assert isinstance(store, EncryptingStore) and "encrypted" in store.probe()
    prefix = b"Return-Path: <alice@remote.test>\r\nDelivered-To: bob@example.test\r\n"
    [where] = store.deliver_batch([StoreItem(BOB, "00aa-0", prefix, MemoryBody(MESSAGE))])
    assert isinstance(where, str)
    [msg] = store.list_messages(BOB)
    assert store.read_message(BOB, msg.message_id) == prefix + MESSAGE
    clear = prefix + MESSAGE
    pieces = {clear[i : i + 12] for i in range(0, len(clear) - 12, 3)}
    found = 0
    for directory, _, files in os.walk(config.datadir):
        for name in files:
            data = open(os.path.join(directory, name), "rb").read()
            found += 1
            assert not [p for p in pieces if p in data], os.path.join(directory, name)
    assert found >= 2  # the key and the message


def test_encrypt_needs_a_key_source(tmp_path):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, encrypt=True)
    assert e.value.key == "storage.encrypt" and "master_key_file" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, master_key_file="a", master_key_passphrase_file="b")
    assert e.value.key == "storage.master_key_file"


@pytest.mark.parametrize("backend", ["mbox", "sql"])
def test_encrypt_is_refused_where_blobs_do_not_fit(tmp_path, backend):
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, backend=backend, encrypt=True, master_key_file="k")
    assert e.value.key == "storage.encrypt" and backend in str(e.value)
    with pytest.raises(ConfigError) as e:
        _config(
            tmp_path, encrypt=True, master_key_file="k", **{"example.test": {"backend": backend}}
        )
    assert e.value.key == 'storage."example.test".backend'


def test_key_paths_are_under_the_datadir_unless_absolute(tmp_path):
    config = _config(tmp_path, master_key_file="keys/master.key")
    assert config.storage.master_key_file == str(tmp_path / "data" / "keys" / "master.key")
    config = _config(tmp_path, master_key_passphrase_file="/etc/mta/pass")
    assert config.storage.master_key_passphrase_file == "/etc/mta/pass"
    assert _config(tmp_path).storage.master_key_file == ""


def test_a_running_store_follows_rotation_and_survives_a_broken_key_file(tmp_path):
    (tmp_path / "master.key").write_bytes(K1)
    store = EncryptingStore(
        MaildirStore(str(tmp_path / "mail"), "mx.example.test"),
        FileKeyring(key_file=str(tmp_path / "master.key")),
    )

    def deliver(tag):
        [where] = store.deliver_batch([StoreItem(BOB, tag, b"", MemoryBody(MESSAGE))])
        assert isinstance(where, str)
        return open(os.path.join(store.mailbox_path(BOB), where), "rb").read()

    assert crypto.blob_key_id(deliver("00aa-0")) == crypto.key_id_of(K1)
    (tmp_path / f"{crypto.key_id_of(K1)}.key").write_bytes(K1)  # what `key rotate` does
    (tmp_path / "master.key").write_bytes(K2)
    assert crypto.blob_key_id(deliver("00aa-1")) == crypto.key_id_of(K2)
    (tmp_path / "master.key").write_bytes(b"short")
    assert crypto.blob_key_id(deliver("00aa-2")) == crypto.key_id_of(K2)
    assert [store.read_message(BOB, m.message_id) for m in store.list_messages(BOB)] == [
        MESSAGE
    ] * 3


def test_twistd_refuses_to_start_without_its_key(tmp_path):
    from twisted.python import usage

    from mta.tap import Options

    path = tmp_path / "mta.toml"
    path.write_text(
        f'datadir = "{tmp_path}/data"\nlocal_domains = ["example.test"]\n'
        'postmaster = "bob@example.test"\n[storage]\nencrypt = true\n'
        'master_key_file = "keys/master.key"\n'
    )
    with pytest.raises(usage.UsageError, match="cannot read the master key"):
        Options().parseOptions(["--config", str(path)])
