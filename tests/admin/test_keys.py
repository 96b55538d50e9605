"""`mta-admin key init|rotate|retire|list`, and `mail cat` of encrypted mail, through
`mta.admin.cli.main`."""

from __future__ import annotations

import io
import json
import os
import stat
import sys

import pytest

from mta.admin import cli, common
from mta.config import load_config
from mta.envelope import Address
from mta.storage import StoreItem, crypto, open_store
from mta.testing import MemoryBody

BOB = Address("bob", "example.test")
MESSAGE = b"Return-Path: <alice@remote.test>\r\nSubject: hush\r\n\r\nthe secret\r\n"
CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test"]
postmaster = "bob@example.test"

[storage]
backend = "{backend}"
encrypt = true
{source}
"""


@pytest.fixture(params=["maildir", "timeseries"])
def backend(request):
    return request.param


@pytest.fixture(params=["key", "passphrase"])
def source(request):
    return request.param


@pytest.fixture
def config_file(tmp_path, monkeypatch, backend, source):
    if source == "key":
        line = 'master_key_file = "keys/master.key"'
    else:
        line = f'master_key_passphrase_file = "{tmp_path}/secret/pass"'
        (tmp_path / "secret").mkdir()
        (tmp_path / "secret" / "pass").write_bytes(b"correct horse battery staple\n")
    path = tmp_path / "mta.toml"
    path.write_text(CONFIG.format(backend=backend, source=line))
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    # Argon2id with small parameters, so the tests stay quick
    monkeypatch.setattr(
        crypto, "ARGON2_DEFAULTS", {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
    )
    return str(path)


@pytest.fixture
def run(config_file, capsysbinary):
    def run(*argv: str):
        status = cli.main(["--config", config_file, *argv])
        out, err = capsysbinary.readouterr()
        return status, out.decode(errors="replace"), err.decode()

    return run


def deliver(config_file, tag, data=MESSAGE):
    store = open_store(load_config(config_file))
    [where] = store.deliver_batch([StoreItem(BOB, tag, b"", MemoryBody(data))])
    assert isinstance(where, str)


def ids(config_file):
    return [m.message_id for m in open_store(load_config(config_file)).list_messages(BOB)]


def blobs(config_file):
    config = load_config(config_file)
    found = []
    for root in (config.path("mail"), config.path("archive")):
        for directory, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(directory, name), "rb") as f:
                    found.append(f.read())
    return found


def test_init_creates_the_key_once(run, config_file, source):
    status, out, err = run("key", "init")
    assert status == 0, err
    config = load_config(config_file)
    path = config.storage.master_key_file or config.storage.master_key_passphrase_file + ".salt"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    if source == "key":
        assert os.path.getsize(path) == 32
    else:
        assert set(json.load(open(path))) >= {"salt", "time_cost", "memory_cost", "parallelism"}
    key_id = crypto.FileKeyring(
        config.storage.master_key_file, config.storage.master_key_passphrase_file
    ).current
    assert key_id in out
    before = open(path, "rb").read()
    status, _, err = run("key", "init")
    assert status == 1 and "already" in err
    assert open(path, "rb").read() == before
    status, out, _ = run("key", "list")
    assert status == 0 and out == f"{key_id}  current\n"


def test_mail_cat_prints_the_decrypted_message(run, config_file):
    assert run("key", "init")[0] == 0
    deliver(config_file, "00aa-0")
    assert all(b"the secret" not in blob for blob in blobs(config_file))
    [message_id] = ids(config_file)
    status, out, err = run("mail", "cat", "bob@example.test", message_id)
    assert status == 0, err
    assert out.encode() == MESSAGE
    status, out, _ = run("mail", "list", "bob@example.test")
    assert status == 0 and "hush" in out


def test_rotate_then_retire(run, config_file):
    assert run("key", "init")[0] == 0
    deliver(config_file, "00aa-0", MESSAGE + b"one\r\n")
    old = crypto.blob_key_id(blobs(config_file)[0])
    status, out, err = run("key", "rotate")
    assert status == 0, err
    assert f"key {old} kept" in out
    deliver(config_file, "00aa-1", MESSAGE + b"two\r\n")
    status, out, _ = run("key", "list")
    new = next(line.split()[0] for line in out.splitlines() if line.endswith("current"))
    assert new != old and old in out
    assert sorted(crypto.blob_key_id(b) for b in blobs(config_file)) == sorted([old, new])
    before = ids(config_file)
    for message_id in before:  # the old message is still readable
        assert run("mail", "cat", "bob@example.test", message_id)[0] == 0

    status, _, err = run("key", "retire", new)
    assert status == 1 and "current key" in err
    status, _, err = run("key", "retire", "00" * 8)
    assert status == 1 and "no key" in err

    status, out, err = run("key", "retire", old)
    assert status == 0, err
    assert "re-wrapped 1 message" in out
    assert [crypto.blob_key_id(b) for b in blobs(config_file)] == [new, new]
    assert ids(config_file) == before  # re-wrapped in place
    status, out, _ = run("key", "list")
    assert out == f"{new}  current\n"
    for message_id, tail in zip(before, (b"one\r\n", b"two\r\n")):
        status, out, err = run("mail", "cat", "bob@example.test", message_id)
        assert status == 0, err
        assert out.encode() == MESSAGE + tail


def test_mail_cat_with_the_wrong_key_says_so(run, config_file, tmp_path, source):
    assert run("key", "init")[0] == 0
    deliver(config_file, "00aa-0")
    [message_id] = ids(config_file)
    config = load_config(config_file)
    if source == "key":
        with open(config.storage.master_key_file, "wb") as f:
            f.write(os.urandom(32))
    else:
        with open(config.storage.master_key_passphrase_file, "wb") as f:
            f.write(b"another passphrase")
    status, _, err = run("mail", "cat", "bob@example.test", message_id)
    assert status == 1 and "wrong master key for key id" in err
    status, out, _ = run("mail", "list", "bob@example.test")
    assert status == 0 and "cannot decrypt" in out
    status, _, err = run(
        "mail", "export", "bob@example.test", "--format", "mbox", str(tmp_path / "x")
    )
    assert status == 1 and "wrong master key for key id" in err


def test_key_commands_need_a_key_source(run, config_file, tmp_path):
    with open(config_file, "w") as f:
        f.write(CONFIG.format(backend="maildir", source="").replace("encrypt = true", ""))
    status, _, err = run("key", "init")
    assert status == 1 and "master_key_file" in err
