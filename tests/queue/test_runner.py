"""Queue runner: delivery, retries on a Clock, partial success, expiry, recovery."""

from __future__ import annotations

import os

import attrs
import pytest
from twisted.internet.defer import Deferred, succeed

from mta.delivery.local import LocalDelivery
from mta.envelope import Address, DeliveryResult, RecipientState
from mta.queue import entry as fmt
from mta.queue.filestore import FileQueueStore
from mta.queue.runner import QueueRunner
from mta.storage import StoreItem
from mta.storage.maildir import MaildirStore
from tests.queue.doubles import InlinePool, ThreadClock, envelope


class ScriptedAgent:
    """Answers each call with `script(call_number, recipient)` -> state, or holds."""

    def __init__(self, clock, script=None, hold=False):
        self.clock = clock
        self.script = script or (lambda n, r: RecipientState.DELIVERED)
        self.hold = hold
        self.calls = []  # (time, qid, recipients, attempts, recovered)
        self.held = []

    def deliver(self, entry, recipients):
        n = len(self.calls)
        self.calls.append(
            (
                self.clock.seconds(),
                entry.qid,
                list(recipients),
                entry.attempts,
                entry.may_be_delivered,
            )
        )
        results = []
        for r in recipients:
            state = self.script(n, r)
            detail = {"deferred": "451 4.4.1 try later", "failed": "550 5.1.1 no such user"}.get(
                state.value, ""
            )
            results.append(DeliveryResult(r, state, detail))
        if self.hold:
            d = Deferred()
            self.held.append((d, results))
            return d
        return succeed(results)

    def release(self, i=0):
        d, results = self.held.pop(i)
        d.callback(results)


@pytest.fixture
def clock():
    return ThreadClock()


@pytest.fixture
def queue_dir(tmp_path):
    return str(tmp_path / "queue")


def make(queue_dir, clock, agent, schedule=(10.0, 20.0), max_age=1000.0, concurrency=5):
    spool = FileQueueStore(queue_dir, clock, InlinePool())
    runner = QueueRunner(spool, agent, clock, schedule, max_age, concurrency)
    return spool, runner


def submit(spool, *rcpts):
    qid = spool.new_queue_id()
    f = spool.open(qid)
    f.write(b"Subject: t\r\n\r\nbody\r\n")
    f.commit(envelope(*rcpts, received_at=spool.reactor.seconds()), b"Received: x\r\n")
    return qid


def files(queue_dir, sub="active"):
    return sorted(os.listdir(os.path.join(queue_dir, sub)))


def test_success_deletes_the_entry(queue_dir, clock):
    agent = ScriptedAgent(clock)
    spool, runner = make(queue_dir, clock, agent)
    runner.startService()
    qid = submit(spool, "bob@example.test")
    assert [c[1] for c in agent.calls] == [qid]
    assert files(queue_dir) == [] and files(queue_dir, "dead") == []
    assert spool.backlog() == 0
    assert runner.depth() == {"incoming": 0, "active": 0, "ready": 0, "deferred": 0}


def test_transient_failure_retries_per_schedule(queue_dir, clock):
    agent = ScriptedAgent(
        clock, lambda n, r: RecipientState.DEFERRED if n < 2 else RecipientState.DELIVERED
    )
    spool, runner = make(queue_dir, clock, agent, schedule=(10.0, 20.0))
    runner.startService()
    qid = submit(spool, "bob@example.test")
    assert files(queue_dir) == [qid, qid + ".status"]
    assert runner.depth()["deferred"] == 1
    clock.advance(9.9)
    assert len(agent.calls) == 1
    clock.advance(0.1)
    assert [(c[0], c[3]) for c in agent.calls] == [(0.0, 0), (10.0, 1)]
    clock.advance(19)
    assert len(agent.calls) == 2
    clock.advance(1)
    assert [c[0] for c in agent.calls] == [0.0, 10.0, 30.0]
    assert files(queue_dir) == []
    assert not clock.getDelayedCalls()


def test_partial_success_persists_and_retries_only_the_rest(queue_dir, clock):
    def script(n, r):
        return RecipientState.DELIVERED if r.local == "a" or n > 0 else RecipientState.DEFERRED

    agent = ScriptedAgent(clock, script)
    spool, runner = make(queue_dir, clock, agent)
    runner.startService()
    qid = submit(spool, "a@example.test", "b@example.test")
    status = fmt.read_status(os.path.join(queue_dir, "active", qid + ".status"))
    assert status["states"] == ["delivered", "deferred"]
    assert status["next_attempt"] == 10.0
    clock.advance(10)
    assert agent.calls[1][2] == [Address("b", "example.test")]
    assert files(queue_dir) == []


def test_max_age_fails_the_remaining_recipients(queue_dir, clock):
    agent = ScriptedAgent(clock, lambda n, r: RecipientState.DEFERRED)
    spool, runner = make(queue_dir, clock, agent, schedule=(10.0,), max_age=25.0)
    runner.startService()
    qid = submit(spool, "bob@example.test")
    clock.pump([5.0] * 10)
    assert [c[0] for c in agent.calls] == [0.0, 10.0, 20.0, 25.0]
    assert files(queue_dir) == []
    assert files(queue_dir, "dead") == [qid, qid + ".status"]
    status = fmt.read_status(os.path.join(queue_dir, "dead", qid + ".status"))
    assert status["states"] == ["failed"] and "expired" in status["reason"]
    assert not clock.getDelayedCalls()


def test_permanent_failure_goes_to_dead_letters(queue_dir, clock):
    agent = ScriptedAgent(
        clock, lambda n, r: RecipientState.FAILED if r.local == "x" else RecipientState.DELIVERED
    )
    spool, runner = make(queue_dir, clock, agent)
    runner.startService()
    qid = submit(spool, "x@example.test", "ok@example.test")
    assert len(agent.calls) == 1
    assert files(queue_dir, "dead") == [qid, qid + ".status"]
    status = fmt.read_status(os.path.join(queue_dir, "dead", qid + ".status"))
    assert status["states"] == ["failed", "delivered"] and "5.1.1" in status["reason"]


def test_concurrency_is_bounded_and_fresh_goes_first(queue_dir, clock):
    # Two entries committed while nothing ran: recovered at startup.
    spool0 = FileQueueStore(queue_dir, clock, InlinePool())
    old = [submit(spool0, "a@example.test"), submit(spool0, "b@example.test")]
    agent = ScriptedAgent(clock, hold=True)
    spool, runner = make(queue_dir, clock, agent, concurrency=1)
    runner.startService()
    assert [c[1] for c in agent.calls] == [old[0]] and agent.calls[0][4] is True
    fresh = submit(spool, "c@example.test")
    assert len(agent.calls) == 1  # the single slot is taken
    assert runner.depth() == {"incoming": 1, "active": 1, "ready": 1, "deferred": 0}
    agent.release()
    assert [c[1] for c in agent.calls] == [old[0], fresh]
    agent.release()
    agent.release()
    assert [c[1] for c in agent.calls] == [old[0], fresh, old[1]]
    assert files(queue_dir) == []


def test_stop_waits_for_attempts_and_keeps_the_rest(queue_dir, clock):
    agent = ScriptedAgent(clock, hold=True)
    spool, runner = make(queue_dir, clock, agent, concurrency=1)
    runner.startService()
    first = submit(spool, "a@example.test")
    second = submit(spool, "b@example.test")
    stopped = []
    runner.stopService().addCallback(stopped.append)
    assert not stopped
    agent.release()
    assert stopped
    assert len(agent.calls) == 1
    assert files(queue_dir) == [second]
    assert first not in files(queue_dir)


# -- restart with real local delivery ------------------------------------------------


def real_runner(tmp_path, queue_dir, clock):
    spool = FileQueueStore(queue_dir, clock, InlinePool())
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test")
    agent = LocalDelivery(store, "mx.example.test", InlinePool(), clock)
    return spool, store, QueueRunner(spool, agent, clock, (10.0,), 1000.0, 5)


def mailbox(tmp_path, local):
    path = tmp_path / "mail" / "example.test" / local / "new"
    return sorted(os.listdir(path)) if path.exists() else []


def test_restart_delivers_pending_entries_exactly_once(tmp_path, queue_dir, clock):
    crashed = FileQueueStore(queue_dir, clock, InlinePool())  # accepted, then the process died
    submit(crashed, "bob@example.test")
    spool, _, runner = real_runner(tmp_path, queue_dir, clock)
    runner.startService()
    assert len(mailbox(tmp_path, "bob")) == 1
    assert files(queue_dir) == []
    runner.stopService()
    _, _, again = real_runner(tmp_path, queue_dir, clock)
    again.startService()
    assert len(mailbox(tmp_path, "bob")) == 1


def test_crash_between_maildir_rename_and_status(tmp_path, queue_dir, clock):
    crashed = FileQueueStore(queue_dir, clock, InlinePool())
    entries = []
    crashed.spool.on_commit = entries.append
    submit(crashed, "bob@example.test", "carol@example.test")
    [entry] = entries
    bob = entry.envelope.recipients[0]
    # The old process put bob's copy into new/ and died before recording it.
    [stored] = MaildirStore(str(tmp_path / "mail")).deliver_batch(
        [StoreItem(bob, entry.job().message_tag(bob), b"", entry.body)]
    )
    assert stored.startswith(str(tmp_path / "mail"))
    _, _, runner = real_runner(tmp_path, queue_dir, clock)
    runner.startService()
    assert len(mailbox(tmp_path, "bob")) == 1
    assert len(mailbox(tmp_path, "carol")) == 1
    assert files(queue_dir) == []


def test_recovered_status_is_respected(tmp_path, queue_dir, clock):
    crashed = FileQueueStore(queue_dir, clock, InlinePool())
    entries = []
    crashed.spool.on_commit = entries.append
    submit(crashed, "bob@example.test", "carol@example.test")
    [entry] = entries
    entry.apply([DeliveryResult.delivered(entry.envelope.recipients[0])])
    entry.attempts, entry.next_attempt = 1, 10.0
    crashed.spool.record(entry)
    _, _, runner = real_runner(tmp_path, queue_dir, clock)
    runner.startService()
    assert mailbox(tmp_path, "carol") == []  # not due yet
    clock.advance(10)
    assert mailbox(tmp_path, "bob") == []  # recorded as delivered: not repeated
    assert len(mailbox(tmp_path, "carol")) == 1
    assert files(queue_dir) == []


def test_a_backlog_beyond_the_window_is_held_as_ids_and_still_delivered(queue_dir, clock):
    """The active window: with deliveries stalled, only `window` entries are kept whole;
    the rest of a large backlog is remembered by queue id and read back from disk when
    its turn comes, so memory does not grow with the queue."""
    agent = ScriptedAgent(clock, hold=True)
    spool = FileQueueStore(queue_dir, clock, InlinePool(), fsync=lambda fd: None, window=20)
    runner = QueueRunner(spool, agent, clock, (10.0,), 1000.0, 5)
    runner.startService()
    qids = [submit(spool, "bob@example.test") for _ in range(300)]
    depth = runner.depth()
    assert depth["incoming"] == 20 and depth["active"] == 5
    assert depth["ready"] == 300 - 20 - 5  # ids only
    assert len(spool._fresh) <= spool.window
    while agent.held:
        agent.release()
    assert agent.calls and sorted({c[1] for c in agent.calls}) == sorted(qids)
    assert files(queue_dir) == []


def test_only_entries_starting_now_keep_their_body_in_memory(queue_dir, clock):
    bodies = []

    class Recording(ScriptedAgent):
        def deliver(self, entry, recipients):
            bodies.append((entry.qid, entry.body.in_memory))
            return super().deliver(entry, recipients)

    agent = Recording(clock, hold=True)
    spool, runner = make(queue_dir, clock, agent, concurrency=1)
    seen = []
    runner.startService()
    hook = spool.spool.on_commit
    spool.spool.on_commit = lambda entry: (seen.append(entry), hook(entry))
    first = submit(spool, "a@example.test")
    second = submit(spool, "b@example.test")  # the only slot is taken: it waits
    assert bodies == [(first, True)]
    assert not seen[1].body.in_memory, "a waiting entry holds no body"
    agent.release()
    assert not seen[0].body.in_memory, "an attempt lets go of the body"
    assert bodies == [(first, True), (second, False)]
    agent.release()
    assert files(queue_dir) == []


def test_log_lines_say_null_sender_and_iso_retry_time(queue_dir, clock):
    """Issue #11: an empty sender reads `<>`, a retry time is ISO-8601 UTC."""
    import io

    from twisted.logger import globalLogPublisher

    from mta.envelope import NULL_ADDRESS
    from mta.observe.logging import make_observer

    stream = io.StringIO()
    observer = make_observer("text", "info", stream)
    globalLogPublisher.addObserver(observer)
    try:
        agent = ScriptedAgent(clock, lambda n, r: RecipientState.DEFERRED)
        spool, runner = make(queue_dir, clock, agent, schedule=(60.0,))
        runner.startService()
        clock.advance(1796337844.74 - clock.seconds())
        qid = spool.new_queue_id()
        f = spool.open(qid)
        f.write(b"Subject: t\r\n\r\nbody\r\n")
        env = envelope("bob@example.test", received_at=clock.seconds())
        f.commit(attrs.evolve(env, sender=NULL_ADDRESS), b"")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = stream.getvalue()
    assert f"queued {qid} from <> to 1 recipient(s)" in text
    assert f"{qid} deferred until 2026-12-03T22:45:04Z" in text  # 1796337904.74
    assert "deferred until 1796" not in text
