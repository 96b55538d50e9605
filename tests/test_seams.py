"""Every seam of mta.interfaces has a real implementation and a fake in mta.testing,
and both provide the whole interface; the queue runner runs unchanged on a second,
in-memory queue store."""

from __future__ import annotations

from zope.interface.verify import verifyObject

from mta.envelope import Address, DeliveryResult, RecipientState
from mta.interfaces import IMailStore, IMessageBody, IQueueControl, IQueueStore, ISpoolFile
from mta.queue.body import FileBody
from mta.queue.control import FileQueueControl
from mta.queue.filestore import FileQueueStore
from mta.queue.runner import QueueRunner
from mta.storage.maildir import MaildirStore
from mta.testing import (
    FakeQueueControl,
    MemoryBody,
    MemoryMailStore,
    MemoryQueueStore,
)
from tests.queue.doubles import InlinePool, ThreadClock, envelope


def test_real_implementations_provide_their_seams(tmp_path):
    clock = ThreadClock()
    store = FileQueueStore(str(tmp_path / "queue"), clock, InlinePool())
    assert verifyObject(IQueueStore, store)
    assert verifyObject(IQueueControl, FileQueueControl(str(tmp_path / "queue")))
    assert verifyObject(IMessageBody, FileBody(b"Received: x\r\n", None, 0, []))
    assert verifyObject(IMailStore, MaildirStore(str(tmp_path / "mail")))
    spool_file = store.open(store.new_queue_id())
    assert verifyObject(ISpoolFile, spool_file)
    spool_file.write(b"Subject: s\r\n\r\nbody\r\n")
    assert verifyObject(IMessageBody, spool_file.body())
    spool_file.abort()


def test_fakes_provide_their_seams():
    clock = ThreadClock()
    assert verifyObject(IQueueStore, MemoryQueueStore(clock))
    assert verifyObject(IQueueControl, FakeQueueControl())
    assert verifyObject(IMessageBody, MemoryBody(b"Subject: s\r\n\r\nbody\r\n"))
    assert verifyObject(IMailStore, MemoryMailStore())


def test_memory_body_and_file_body_read_alike(tmp_path):
    message = b"Subject: s\r\nFrom: a@b\r\n\r\nbody\r\n" * 3
    path = tmp_path / "q"
    path.write_bytes(message[13:] + b"TRAILER")
    file_body = FileBody(message[:13], str(path), len(message) - 13)
    memory = MemoryBody(message)
    for body in (file_body, memory):
        assert body.size == len(message)
        assert body.header_block() == b"Subject: s\r\nFrom: a@b\r\n"
        assert body.header_block(20) == b"Subject: s\r\n"
        assert b"".join(body.chunks(7)) == message
        out = tmp_path / f"out-{id(body)}"
        with open(out, "wb") as f:
            assert body.copy_into(f.fileno(), b"X: y\r\n") == len(message) + 6
        assert out.read_bytes() == b"X: y\r\n" + message


class Agent:
    """Defers everything on the first attempt, delivers on the second; fails `bad`."""

    def __init__(self, bad=()):
        self.calls = []
        self.bad = set(bad)

    def deliver(self, job, recipients):
        from twisted.internet.defer import succeed

        self.calls.append((job.qid, job.attempts, b"".join(job.body.chunks())))
        out = []
        for r in recipients:
            if str(r) in self.bad:
                out.append(DeliveryResult.failed(r, "550 5.1.1 no such user"))
            elif job.attempts == 0:
                out.append(DeliveryResult.deferred(r, "451 4.4.1 later"))
            else:
                out.append(DeliveryResult.delivered(r))
        return succeed(out)


def test_the_runner_runs_on_an_in_memory_queue_store():
    clock = ThreadClock()
    store = MemoryQueueStore(clock)
    agent = Agent(bad={"bad@remote.test"})
    runner = QueueRunner(store, agent, clock, (30.0,), 1000.0, 5)
    runner.startService()
    f = store.open(store.new_queue_id())
    f.write(b"Subject: s\r\n\r\nbody\r\n")
    f.commit(envelope("bob@remote.test", received_at=0.0), b"Received: x\r\n")
    [(qid, attempts, data)] = agent.calls
    assert attempts == 0 and data == b"Received: x\r\nSubject: s\r\n\r\nbody\r\n"
    assert store.depth()["deferred"] == 1 and store.finished == []
    clock.advance(30)
    assert [c[:2] for c in agent.calls] == [(qid, 0), (qid, 1)]
    assert [e.qid for e in store.finished] == [qid] and store.backlog() == 0
    g = store.open(store.new_queue_id())
    g.write(b"Subject: t\r\n\r\nx\r\n")
    g.commit(envelope("bad@remote.test", received_at=clock.seconds()), b"")
    [(entry, reason)] = store.dead
    assert entry.envelope.recipients == (Address("bad", "remote.test"),)
    assert "550 5.1.1" in reason
    assert entry.states == [RecipientState.FAILED]
    runner.stopService()
