"""`mta-admin mail list|cat|export|delete`, on every file-based backend."""

from __future__ import annotations

import io
import mailbox
import os
import sys

import pytest

from mta.admin import cli, common
from mta.config import load_config
from mta.envelope import Address
from mta.storage import StoreItem, open_store
from mta.testing import MemoryBody

CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test"]
postmaster = "alice@example.test"
"""
BOB = Address("bob", "example.test")
ONE = (
    b"Return-Path: <alice@remote.test>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\nFrom me\r\n\xff\r\n"
)
TWO = b"Subject: second\r\n\r\ntwo\r\n"


@pytest.fixture(params=["maildir", "mbox", "timeseries"])
def backend(request):
    return request.param


@pytest.fixture
def config_file(tmp_path, monkeypatch, backend):
    path = tmp_path / "mta.toml"
    path.write_text(CONFIG + f'\n[storage]\nbackend = "{backend}"\n')
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return str(path)


@pytest.fixture
def run(config_file, capsysbinary):
    """main() with --config; returns (exit status, stdout bytes, stderr text)."""

    def run(*argv: str):
        status = cli.main(["--config", config_file, *argv])
        out, err = capsysbinary.readouterr()
        return status, out, err.decode()

    return run


@pytest.fixture
def store(config_file):
    store = open_store(load_config(config_file))
    for tag, data in (("00aa-0", ONE), ("00ab-0", TWO)):
        [outcome] = store.deliver_batch([StoreItem(BOB, tag, b"", MemoryBody(data))])
        assert isinstance(outcome, str)
    return store


def stored(store, data):
    return data.replace(b"\r\n", b"\n") if store.name == "mbox" else data


def test_list_shows_id_date_size_subject(run, store):
    status, out, err = run("mail", "list", "Bob@example.test")
    assert status == 0, err
    header, first, second = out.decode().splitlines()
    assert header.split() == ["ID", "DATE", "SIZE", "FOLDER", "SUBJECT"]
    one, two = store.list_messages(BOB)
    assert first.startswith(one.message_id) and first.split()[-2:] == ["INBOX", "café"]
    assert f" {len(stored(store, ONE))} " in first
    assert second.startswith(two.message_id) and second.endswith("second")
    status, out, _ = run("mail", "list", "bob@example.test", "--folder", "Sent")
    assert (status, out) == (0, b"No mail for bob@example.test\n")
    assert run("mail", "list", "nobody@example.test")[:2] == (
        0,
        b"No mail for nobody@example.test\n",
    )


def test_cat_writes_the_exact_bytes(run, store):
    one, _ = store.list_messages(BOB)
    status, out, err = run("mail", "cat", "bob@example.test", one.message_id)
    assert status == 0, err
    assert out == stored(store, ONE)
    status, out, err = run("mail", "cat", "bob@example.test", "no-such-id")
    assert status == 1 and out == b""
    assert err == "mta-admin: bob@example.test: no message no-such-id\n"


def test_delete(run, store):
    one, two = store.list_messages(BOB)
    status, out, err = run("mail", "delete", "bob@example.test", one.message_id)
    assert status == 0, err
    assert out.decode() == f"deleted {one.message_id} from bob@example.test\n"
    assert [m.message_id for m in store.list_messages(BOB)] == [two.message_id]
    status, _, err = run("mail", "delete", "bob@example.test", one.message_id)
    assert status == 1 and "no message" in err


def test_export_to_mbox(run, store, tmp_path):
    status, out, err = run(
        "mail", "export", "bob@example.test", "--format", "mbox", str(tmp_path / "x")
    )
    assert status == 0, err
    path = tmp_path / "x" / "example.test" / "bob.mbox"
    assert out.decode() == f"exported 2 messages to {path}\n"
    box = mailbox.mbox(str(path), create=False)
    try:
        assert [m["Subject"] for m in box] == ["=?utf-8?q?caf=C3=A9?=", "second"]
        assert box.get_message(box.keys()[0]).get_from().startswith("alice@remote.test ")
    finally:
        box.close()
    status, _, err = run(
        "mail", "export", "bob@example.test", "--format", "mbox", str(tmp_path / "x")
    )
    assert status == 1 and "already holds mail" in err


def test_export_to_maildir(run, store, tmp_path):
    status, out, err = run(
        "mail", "export", "bob@example.test", "--format", "maildir", str(tmp_path / "x")
    )
    assert status == 0, err
    box = mailbox.Maildir(str(tmp_path / "x" / "example.test" / "bob"), create=False)
    assert sorted(box.get_bytes(k) for k in box.keys()) == sorted(
        [stored(store, ONE), stored(store, TWO)]
    )


def test_bad_addresses_and_usage(run, store):
    status, _, err = run("mail", "list", "not-an-address")
    assert status == 1 and err.startswith("mta-admin: ")
    assert run("mail", "export", "bob@example.test", "DIR")[0] == 2  # --format is required
    assert not os.path.exists("DIR")
