"""mta-admin quarantine list|show|release|delete, on files the QuarantineAgent wrote."""

from __future__ import annotations

import os

import attrs

from mta.delivery.quarantine import QuarantineAgent
from mta.envelope import DeliveryJob
from mta.queue.entry import read_entry
from mta.testing import MemoryBody
from tests.queue.doubles import InlinePool, ThreadClock, envelope

MESSAGE = b"Received: from client\r\nSubject: invoice\r\n\r\nsee attachment\r\n"
QID = "00000000000aa0000010001"


def quarantine(datadir, qid=QID, reason="attachments: blocked file evil.exe"):
    clock = ThreadClock()
    clock.advance(1_700_000_000)
    agent = QuarantineAgent(str(datadir / "quarantine"), InlinePool(), clock)
    env = attrs.evolve(
        envelope("bob@example.test", "carol@far.test"),
        quarantine=reason,
        client_address="192.0.2.9",
    )
    out = []
    agent.deliver(DeliveryJob(qid, env, MemoryBody(MESSAGE)), env.recipients).addCallback(
        out.append
    )
    assert out, "the agent did not answer"


def test_list_empty(run):
    assert run("quarantine", "list") == (0, "Quarantine is empty\n", "")


def test_list_and_show(run, datadir):
    quarantine(datadir)
    status, out, err = run("quarantine", "list")
    assert status == 0, err
    assert QID in out and "<sender@remote.test>" in out
    assert "bob@example.test, carol@far.test" in out and "blocked file evil.exe" in out
    status, out, err = run("quarantine", "show", QID)
    assert status == 0, err
    assert "Reasons: attachments: blocked file evil.exe" in out
    assert "To: <carol@far.test>" in out and "Subject: invoice" in out
    assert "see attachment" not in out
    status, out, _ = run("quarantine", "show", "--full", QID)
    assert "see attachment" in out


def test_unknown_ids(run, datadir):
    for action in ("show", "release", "delete"):
        status, _, err = run("quarantine", action, "0123abcd")
        assert status == 1
        assert "0123abcd: no such message in the quarantine" in err
    status, _, err = run("quarantine", "show", "../mta")
    assert status == 1 and "no such message" in err


def test_delete(run, datadir):
    quarantine(datadir)
    assert run("quarantine", "delete", QID) == (0, f"{QID} deleted\n", "")
    assert os.listdir(datadir / "quarantine") == []
    assert run("quarantine", "list")[1] == "Quarantine is empty\n"


def test_release_requeues_with_the_original_envelope(run, datadir):
    quarantine(datadir)
    status, out, err = run("quarantine", "release", QID)
    assert status == 0, err
    assert out.startswith(f"{QID} released: queued as ")
    new_qid = out.split()[-1]
    assert os.listdir(datadir / "quarantine") == []
    path = datadir / "queue" / "active" / new_qid
    entry = read_entry(str(path))
    assert entry.envelope.quarantine is None
    assert [str(r) for r in entry.envelope.recipients] == ["bob@example.test", "carol@far.test"]
    assert str(entry.envelope.sender) == "sender@remote.test"
    assert entry.envelope.client_address == "192.0.2.9"
    assert entry.trace_headers.startswith(f"X-Quarantine-Released: {QID} by mta-admin".encode())
    with open(path, "rb") as f:
        assert f.read(entry.body_length) == MESSAGE
    status, out, _ = run("queue", "list")
    assert new_qid in out
