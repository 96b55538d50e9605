"""Queue control: commands through the control directory, no race with delivery."""

from __future__ import annotations

import json
import os
import threading

import pytest
from twisted.internet.defer import Deferred, succeed

from mta.envelope import DeliveryResult, RecipientState
from mta.queue import control
from mta.queue import entry as fmt
from mta.queue.control import ControlError, QueueControl
from mta.queue.filestore import FileQueueStore
from mta.queue.runner import QueueRunner
from tests.queue.doubles import InlinePool, ThreadClock, envelope


class Agent:
    """Defers everything (or holds the attempt open until released)."""

    def __init__(self, state=RecipientState.DEFERRED, hold=False):
        self.state = state
        self.hold = hold
        self.calls = []
        self.held = []

    def deliver(self, entry, recipients):
        self.calls.append(entry.qid)
        results = [DeliveryResult(r, self.state, "451 4.4.1 try later") for r in recipients]
        if self.hold:
            d = Deferred()
            self.held.append((d, results))
            return d
        return succeed(results)


@pytest.fixture
def clock():
    return ThreadClock()


@pytest.fixture
def setup(tmp_path, clock):
    def make(agent):
        pool = InlinePool()
        spool = FileQueueStore(str(tmp_path / "queue"), clock, pool)
        runner = QueueRunner(spool, agent, clock, (100.0,), 10000.0, 5)
        ctl = QueueControl(spool, clock, pool)
        ctl.startService()
        runner.startService()
        return spool, runner, ctl

    yield make


def submit(spool, *rcpts):
    qid = spool.new_queue_id()
    f = spool.open(qid)
    f.write(b"Subject: t\r\n\r\nbody\r\n")
    f.commit(envelope(*rcpts, received_at=spool.reactor.seconds()), b"")
    return qid


def run(ctl, action, qid=None):
    out = []
    Deferred.fromCoroutine(ctl.execute(action, qid)).addBoth(out.append)
    (result,) = out
    if isinstance(result, Exception) or hasattr(result, "raiseException"):
        result.raiseException()
    return result


def names(spool, place):
    return sorted(n for n in os.listdir(os.path.join(spool.queue_dir, place)) if fmt.is_queue_id(n))


def test_hold_release_of_a_deferred_entry(setup, clock):
    agent = Agent()
    spool, runner, ctl = setup(agent)
    qid = submit(spool, "bob@remote.test")
    assert agent.calls == [qid] and runner.depth()["deferred"] == 1
    assert run(ctl, "hold", qid) == f"{qid} held"
    assert names(spool, "hold") == [qid] and names(spool, "active") == []
    assert os.path.exists(os.path.join(spool.queue_dir, "hold", qid + fmt.STATUS_SUFFIX))
    assert runner.depth()["deferred"] == 0 and spool.backlog() == 0
    clock.advance(1000)
    assert agent.calls == [qid]  # never tried while held
    with pytest.raises(ControlError):
        run(ctl, "hold", qid)
    assert run(ctl, "release", qid) == f"{qid} released"
    assert agent.calls == [qid, qid] and spool.backlog() == 1
    assert names(spool, "active") == [qid]


def test_hold_waits_for_the_attempt_in_flight(setup, clock):
    agent = Agent(hold=True)
    spool, runner, ctl = setup(agent)
    qid = submit(spool, "bob@remote.test")
    out = []
    Deferred.fromCoroutine(ctl.execute("hold", qid)).addBoth(out.append)
    assert out == [] and names(spool, "active") == [qid]  # not moved under delivery
    d, results = agent.held.pop()
    d.callback(results)  # the attempt ends deferred: it must not be rescheduled
    assert out == [f"{qid} held"]
    assert names(spool, "hold") == [qid]
    assert runner.depth() == {"incoming": 0, "active": 0, "ready": 0, "deferred": 0}
    assert spool._timer is None  # no retry timer for the held entry


def test_delete_and_retry_and_flush(setup, clock):
    agent = Agent()
    spool, runner, ctl = setup(agent)
    a = submit(spool, "a@remote.test")
    b = submit(spool, "b@remote.test")
    assert run(ctl, "retry", a) == f"{a} scheduled now"
    assert agent.calls == [a, b, a]
    assert run(ctl, "flush").startswith("2 deferred")
    assert agent.calls[-2:] in ([a, b], [b, a])
    assert run(ctl, "delete", b) == f"{b} deleted"
    assert names(spool, "active") == [a] and spool.backlog() == 1
    with pytest.raises(ControlError):
        run(ctl, "retry", b)
    with pytest.raises(ControlError):
        run(ctl, "delete", b)


def test_requeue_a_dead_letter_resets_failures_and_age(setup, clock):
    agent = Agent(state=RecipientState.FAILED)
    spool, runner, ctl = setup(agent)
    qid = submit(spool, "bob@remote.test")  # no bouncer: straight to dead/
    assert names(spool, "dead") == [qid]
    clock.advance(50000)  # far beyond max_age
    agent.state = RecipientState.DEFERRED
    assert run(ctl, "requeue", qid) == f"{qid} requeued"
    assert agent.calls == [qid, qid]  # tried again at once, not expired
    entry = fmt.read_entry(os.path.join(spool.queue_dir, "active", qid))
    assert entry.created == 50000.0 and entry.states == [RecipientState.DEFERRED]
    assert entry.attempts == 1


def test_commands_arrive_through_the_control_directory(setup, clock):
    agent = Agent()
    spool, runner, ctl = setup(agent)
    qid = submit(spool, "bob@remote.test")
    answer = {}

    def cli():
        answer["message"] = control.send_command(
            spool.queue_dir, "hold", qid, timeout=30, poll=0.01
        )

    t = threading.Thread(target=cli)
    t.start()
    directory = os.path.join(spool.queue_dir, "control")
    for _ in range(3000):  # bounded: until the command file is there
        if any(n.endswith(".cmd") for n in os.listdir(directory)):
            break
        t.join(0.01)
    clock.advance(1.0)  # the poll runs (InlinePool: synchronously)
    t.join(30)
    assert answer == {"message": f"{qid} held"}
    assert sorted(os.listdir(directory)) == ["lock"]


def test_lock_tells_cli_whether_the_server_runs(setup, tmp_path):
    spool, runner, ctl = setup(Agent())
    other = control.OwnerLock(spool.queue_dir)
    assert not other.acquire()
    ctl.stopService()
    assert other.acquire()
    other.release()


def test_offline_operations(tmp_path, clock):
    pool = InlinePool()
    spool = FileQueueStore(str(tmp_path / "queue"), clock, pool)
    runner = QueueRunner(spool, Agent(), clock, (100.0,), 10000.0, 5)
    runner.startService()
    qid = submit(spool, "bob@remote.test")
    runner.stopService()
    root = spool.queue_dir
    assert control.locate(str(tmp_path / "queue"), qid) == (root, "active")
    assert "1 deferred" in control.run_offline(root, "flush", None, 0.0)
    assert fmt.read_status(os.path.join(root, "active", qid + ".status"))["next_attempt"] == 0
    control.run_offline(root, "hold", qid, 0.0)
    assert control.locate(str(tmp_path / "queue"), qid) == (root, "hold")
    text = control.describe(str(tmp_path / "queue"), qid)
    assert "<bob@remote.test> [deferred]: 451 4.4.1 try later" in text
    assert "Subject: t" in text and "hold" in text
    held = control.held_summaries(str(tmp_path / "queue"))
    assert [(h.qid, h.state) for h in held] == [(qid, "hold")]
    control.run_offline(root, "release", qid, 0.0)
    control.run_offline(root, "delete", qid, 0.0)
    with pytest.raises(ControlError):
        control.locate(str(tmp_path / "queue"), qid)


def test_bad_commands_get_an_answer(setup, clock):
    spool, runner, ctl = setup(Agent())
    directory = os.path.join(spool.queue_dir, "control")
    with open(os.path.join(directory, "x.cmd"), "w") as f:
        json.dump({"version": 1, "action": "explode", "qid": "0" * 16}, f)
    with open(os.path.join(directory, "y.cmd"), "w") as f:
        f.write("not json")
    clock.advance(1.0)
    for name in ("x", "y"):
        with open(os.path.join(directory, f"{name}.result")) as f:
            assert json.load(f)["ok"] is False
