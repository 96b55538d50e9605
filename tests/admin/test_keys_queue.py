"""Encryption at rest beyond the stores: the quarantine and the queue's resting
entries are sealed with the same master keys, and `mta-admin key retire` moves them
to the current key (or refuses while the active queue still needs the old one)."""

from __future__ import annotations

import io
import os
import sys

import pytest

from mta.admin import cli, common
from mta.config import load_config
from mta.crypto.keys import DecryptionError, open_keyring
from mta.delivery.quarantine import QuarantineAgent, read_message
from mta.envelope import Address, DeliveryJob, Envelope
from mta.queue import entry as fmt
from mta.queue import hold_message
from mta.queue.layout import ACTIVE, DEAD, HOLD
from mta.testing import MemoryBody

MARK = b"QUARANTINED-SECRET-91"
MESSAGE = b"Subject: " + MARK + b"\r\n\r\nbody " + MARK + b"\r\n"
CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test"]
postmaster = "bob@example.test"

[storage]
master_key_file = "keys/master.key"

[queue]
encrypt = true
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    path = tmp_path / "mta.toml"
    path.write_text(CONFIG)
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return str(path)


@pytest.fixture
def run(config_file, capsysbinary):
    def run(*argv: str):
        status = cli.main(["--config", config_file, *argv])
        out, err = capsysbinary.readouterr()
        return status, out.decode(errors="replace"), err.decode()

    assert run("key", "init")[0] == 0
    return run


def envelope() -> Envelope:
    return Envelope(
        sender=Address("alice", "remote.test"),
        recipients=(Address("bob", "example.test"),),
        client_address="192.0.2.1",
        quarantine="spam: 12.5",
    )


def quarantine(config, qid: str) -> None:
    agent = QuarantineAgent(config.path("quarantine"), None, None, keyring=open_keyring(config))
    record = {
        "qid": qid,
        "sender": ["alice", "remote.test"],
        "recipients": [["bob", "example.test"]],
    }
    agent._store(DeliveryJob(qid, envelope(), MemoryBody(MESSAGE)), record)


def files_under(root) -> bytes:
    out = []
    for base, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out.append(f.read())
    return b"".join(out)


def test_quarantine_is_sealed_and_shown_decrypted(run, config_file):
    config = load_config(config_file)
    quarantine(config, "q1")
    assert MARK not in files_under(config.path("quarantine"))
    status, out, err = run("quarantine", "show", "q1")
    assert status == 0, err
    assert "Subject: " + MARK.decode() in out
    with pytest.raises(DecryptionError, match="encrypted"):
        read_message(config.path("quarantine"), "q1")


def test_retire_rewraps_quarantine_and_resting_queue_entries(run, config_file):
    config = load_config(config_file)
    quarantine(config, "q1")
    held = hold_message(config, envelope(), MESSAGE, b"Received: by test\r\n")
    dead = hold_message(config, envelope(), MESSAGE + b"dead\r\n")
    os.makedirs(os.path.join(config.path("queue"), DEAD))
    os.rename(
        os.path.join(config.path("queue"), HOLD, dead),
        os.path.join(config.path("queue"), DEAD, dead),
    )
    old = open_keyring(config).current
    assert run("key", "rotate")[0] == 0
    status, out, err = run("key", "retire", old)
    assert status == 0, err
    assert "re-wrapped 3 message(s)" in out
    ring = open_keyring(config)
    assert old not in ring.keys  # the old key is gone, and everything still reads
    assert read_message(config.path("quarantine"), "q1", ring) == MESSAGE
    for qid, place, body in ((held, HOLD, MESSAGE), (dead, DEAD, MESSAGE + b"dead\r\n")):
        entry = fmt.read_entry(os.path.join(config.path("queue"), place, qid), keyring=ring)
        assert b"".join(entry.body.chunks()).endswith(body)
    assert MARK not in files_under(config.path("queue"))


def test_retire_refuses_while_the_active_queue_uses_the_key(run, config_file):
    config = load_config(config_file)
    qid = hold_message(config, envelope(), MESSAGE)
    queue = config.path("queue")
    os.makedirs(os.path.join(queue, ACTIVE))
    os.rename(os.path.join(queue, HOLD, qid), os.path.join(queue, ACTIVE, qid))
    old = open_keyring(config).current
    assert run("key", "rotate")[0] == 0
    status, _, err = run("key", "retire", old)
    assert status == 1
    assert "1 queued message(s) in the active queue are sealed under key" in err
    assert old in open_keyring(config).keys
