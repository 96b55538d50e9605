"""QuarantineAgent: one durable copy per message, DELIVERED for every recipient; the
router sends quarantined jobs to it."""

from __future__ import annotations

import json
import os

import attrs
from twisted.internet.defer import succeed
from zope.interface.verify import verifyObject

from mta.delivery import quarantine as q
from mta.delivery.router import Router
from mta.envelope import Address, DeliveryJob, DeliveryResult, RecipientState
from mta.interfaces import IDeliveryAgent
from mta.testing import MemoryBody
from tests.queue.doubles import InlinePool, ThreadClock, envelope

MESSAGE = b"Received: from x\r\nSubject: hi\r\n\r\nbody\r\n" * 3


def job(*rcpts, reason="attachments: blocked file evil.exe", qid="0123456789abcdef"):
    env = attrs.evolve(envelope(*rcpts), quarantine=reason)
    return DeliveryJob(qid, env, MemoryBody(MESSAGE))


def agent(tmp_path, fsyncs=None):
    clock = ThreadClock()
    clock.advance(1000)

    def fsync(fd):
        if fsyncs is not None:
            fsyncs.append(fd)
        os.fsync(fd)

    return q.QuarantineAgent(str(tmp_path / "quarantine"), InlinePool(), clock, fsync=fsync)


def results_of(d):
    out = []
    d.addCallback(out.append)
    return out[0]


def test_interface(tmp_path):
    assert verifyObject(IDeliveryAgent, agent(tmp_path))


def test_writes_once_with_sidecar(tmp_path):
    fsyncs = []
    a = agent(tmp_path, fsyncs)
    j = job("a@example.test", "b@far.test")
    results = results_of(a.deliver(j, j.envelope.recipients))
    assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    assert results[0].detail == "quarantined: attachments: blocked file evil.exe"
    directory = tmp_path / "quarantine"
    assert sorted(os.listdir(directory)) == ["0123456789abcdef.eml", "0123456789abcdef.json"]
    assert (directory / "0123456789abcdef.eml").read_bytes() == MESSAGE
    record = json.loads((directory / "0123456789abcdef.json").read_text())
    assert record["reasons"] == ["attachments: blocked file evil.exe"]
    assert record["recipients"] == [["a", "example.test"], ["b", "far.test"]]
    assert record["quarantined_at"] == 1000
    assert len(fsyncs) == 3  # two files and the directory
    env = q.record_envelope(record)
    assert env.quarantine is None
    assert env.recipients == (Address("a", "example.test"), Address("b", "far.test"))
    assert env.sender == j.envelope.sender


def test_admin_helpers(tmp_path):
    a = agent(tmp_path)
    j = job("a@example.test")
    results_of(a.deliver(j, j.envelope.recipients))
    directory = str(tmp_path / "quarantine")
    assert [r["qid"] for r in q.list_quarantine(directory)] == [j.qid]
    assert q.read_message(directory, j.qid) == MESSAGE
    q.delete_quarantined(directory, j.qid)
    assert q.list_quarantine(directory) == []
    for bad in (j.qid, "../etc"):
        try:
            q.read_record(directory, bad)
        except q.NotQuarantined as e:
            assert "no such message" in str(e)
        else:
            raise AssertionError("expected NotQuarantined")
    assert q.list_quarantine(str(tmp_path / "missing")) == []


class Recorder:
    def __init__(self):
        self.calls = []

    def deliver(self, job, recipients):
        self.calls.append(list(recipients))
        return succeed([DeliveryResult.delivered(r, "x") for r in recipients])


def test_router_sends_quarantined_jobs_to_the_quarantine(tmp_path):
    local, remote, held = Recorder(), Recorder(), Recorder()
    router = Router(["example.test"], local, remote, quarantine_agent=held)
    j = job("a@example.test", "b@far.test")
    results = results_of(router.deliver(j, j.envelope.recipients))
    assert held.calls == [[Address("a", "example.test"), Address("b", "far.test")]]
    assert local.calls == remote.calls == []
    assert [r.state for r in results] == [RecipientState.DELIVERED] * 2
    plain = attrs.evolve(j, envelope=attrs.evolve(j.envelope, quarantine=None))
    results_of(router.deliver(plain, plain.envelope.recipients))
    assert local.calls == [[Address("a", "example.test")]]


def test_router_without_quarantine_defers(tmp_path):
    local = Recorder()
    j = job("a@example.test")
    results = results_of(Router(["example.test"], local).deliver(j, j.envelope.recipients))
    assert local.calls == []
    assert results[0].state is RecipientState.DEFERRED
    assert "quarantine not configured" in results[0].detail


def test_router_quarantine_error_defers(tmp_path):
    class Broken:
        def deliver(self, job, recipients):
            raise OSError("disk on fire")

    j = job("a@example.test")
    router = Router(["example.test"], Recorder(), quarantine_agent=Broken())
    results = results_of(router.deliver(j, j.envelope.recipients))
    assert results[0].state is RecipientState.DEFERRED
