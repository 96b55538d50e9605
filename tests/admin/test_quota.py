"""`mta-admin user quota|show|list` and the usage that `mail delete` and `--recount`
keep true, on the real database and real stores."""

from __future__ import annotations

import io
import sys

import pytest

from mta.admin import cli, common
from mta.config import load_config
from mta.db import MIB, Database
from mta.envelope import Address
from mta.storage import StoreItem, open_store
from mta.storage.quota import QuotaStore
from mta.testing import MemoryBody

CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test"]
postmaster = "alice@example.test"
"""
BOB = Address("bob", "example.test")
PREFIX = b"Return-Path: <alice@remote.test>\r\nDelivered-To: bob@example.test\r\n"
MESSAGE = b"Subject: hello\r\n\r\n" + b"a line of text\r\n" * 5000


@pytest.fixture(params=["maildir", "mbox", "sql"])
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
def bob(run, datadir):
    status, _, err = run("user", "add", "bob@example.test", "--no-password")
    assert status == 0, err
    with Database(str(datadir / "mta.db")) as database:
        yield database


def deliver(config_file, db, count=2, *, counted=True):
    """`count` messages into bob's mailbox, through the quota layer or around it."""
    store = open_store(load_config(config_file))
    if counted:
        store = QuotaStore(store, lambda: db)
    items = [StoreItem(BOB, f"00a{i}-0", PREFIX, MemoryBody(MESSAGE)) for i in range(count)]
    outcomes = store.deliver_batch(items)
    assert all(isinstance(o, str) for o in outcomes), outcomes
    close = getattr(store, "close", None)
    if close is not None:
        close()
    return sum(item.size for item in items)


@pytest.mark.parametrize("backend", ["maildir"])
def test_set_show_and_remove_a_quota(run, bob):
    status, out, err = run("user", "quota", "Bob@example.test", "500")
    assert status == 0, err
    assert out.strip() == "bob@example.test: 0 MB used of 500 MB (0%)"
    assert bob.require_user("bob@example.test").quota_mb == 500
    assert bob.audit_entries()[-1].action == "user.quota"
    assert bob.audit_entries()[-1].details["quota_mb"] == 500
    bob.set_usage("bob@example.test", 300 * MIB)
    status, out, _ = run("user", "quota", "bob@example.test")
    assert status == 0 and out.strip() == "bob@example.test: 300 MB used of 500 MB (60%)"
    for unlimited in ("none", "0"):
        run("user", "quota", "bob@example.test", "500")
        status, out, _ = run("user", "quota", "bob@example.test", unlimited)
        assert status == 0 and out.strip() == "bob@example.test: 300 MB used, no quota"
        assert bob.require_user("bob@example.test").quota_mb is None


@pytest.mark.parametrize("backend", ["maildir"])
@pytest.mark.parametrize("bad", ["-1", "1.5", "lots"])
def test_a_bad_quota_is_a_usage_error(run, bob, bad):
    status, _, err = run("user", "quota", "bob@example.test", bad)
    assert status == 2
    assert "expected a whole number of MB, or none" in err
    assert bob.require_user("bob@example.test").quota_mb is None


@pytest.mark.parametrize("backend", ["maildir"])
def test_quota_of_an_unknown_user(run, bob):
    status, _, err = run("user", "quota", "nobody@example.test", "5")
    assert status == 1 and "no such user: nobody@example.test" in err


@pytest.mark.parametrize("backend", ["maildir"])
def test_list_and_show_print_quota_and_usage(run, bob):
    run("user", "quota", "bob@example.test", "2")
    bob.set_usage("bob@example.test", MIB + MIB // 2)
    run("user", "add", "carol@example.test", "--no-password")
    status, out, _ = run("user", "list")
    assert status == 0
    header, *rows = out.splitlines()
    assert header.split()[-1] == "USED/QUOTA"
    [line] = [r for r in rows if r.startswith("bob@")]
    assert line.endswith("1.5/2 MB")
    [carol] = [r for r in rows if r.startswith("carol@")]
    assert carol.endswith("0/- MB")
    status, out, _ = run("user", "show", "bob@example.test")
    assert status == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    assert fields["quota"].strip() == "2 MB"
    assert fields["used"].strip() == "1.5 MB used of 2 MB (75%)"
    assert fields["send as"].strip() == "own addresses"


def test_mail_delete_gives_the_size_back(run, bob, config_file):
    total = deliver(config_file, bob)
    assert bob.require_user("bob@example.test").used_bytes == total
    status, out, _ = run("mail", "list", "bob@example.test")
    first_id = out.splitlines()[1].split()[0]
    status, out, err = run("mail", "delete", "bob@example.test", first_id)
    assert status == 0, err
    assert bob.require_user("bob@example.test").used_bytes == total // 2
    status, out, _ = run("user", "quota", "bob@example.test")
    assert out.strip() == f"bob@example.test: {(total // 2) / MIB:.1f} MB used, no quota"


def test_recount_repairs_drift(run, bob, config_file):
    total = deliver(config_file, bob, 3, counted=False)  # mail the server never counted
    assert bob.require_user("bob@example.test").used_bytes == 0
    status, out, err = run("user", "quota", "bob@example.test", "--recount")
    assert status == 0, err
    assert bob.require_user("bob@example.test").used_bytes == total
    assert out.splitlines() == [
        "recounted bob@example.test: was 0 MB",
        f"bob@example.test: {total / MIB:.1f} MB used, no quota",
    ]
    entry = bob.audit_entries()[-1]
    assert entry.action == "user.quota_recount" and entry.details["after"] == total
    status, out, _ = run("user", "quota", "bob@example.test", "1", "--recount")
    assert status == 0 and out.strip().endswith(f"of 1 MB ({100 * total // MIB}%)")
