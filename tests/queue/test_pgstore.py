"""The PostgreSQL queue store on a real PostgreSQL: receiving, the runner on it,
claims and leases on an injected clock, two nodes racing, results recorded at once,
LISTEN/NOTIFY, and a connection killed mid-operation.

Each "node" is a `PGQueueStore` with its own clock and node id; their SQL runs
inline (`InlinePool`), so every Deferred has fired when a call returns.
"""

from __future__ import annotations

import threading

import pytest
from attrs import evolve as attrs_evolve
from twisted.internet.defer import succeed
from zope.interface.verify import verifyObject

from mta.envelope import Address, DeliveryResult, RecipientState
from mta.interfaces import IMessageBody, IQueueStore, ISpoolFile
from mta.queue.pgconn import Connections, QueueUnavailable
from mta.queue.pgstore import PGQueueStore
from mta.queue.runner import QueueRunner
from tests.queue.conftest import empty_queue
from tests.queue.doubles import InlinePool, ThreadClock, envelope
from tests.queue.pgtesting import terminate_backends

MESSAGE = b"Subject: s\r\nMessage-ID: <m@remote.test>\r\n\r\nbody\r\n"


@pytest.fixture
def nodes(dsn):
    """make(name, **options) -> a store ("node") on the shared queue, emptied first."""
    made = []
    empty_queue(dsn)

    def make(name="a", clock=None, **options):
        clock = clock or ThreadClock()
        options.setdefault("listen", False)
        store = PGQueueStore(
            Connections(dsn),
            clock,
            InlinePool(),
            spill_dir=str(options.pop("tmp")) if "tmp" in options else "/nonexistent",
            hostname=f"{name}.test",
            node=f"{name}.test/1/x",
            **options,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.stop()
        store.connections.close()


def commit(store, *rcpts, body=MESSAGE, at=None):
    f = store.open(store.new_queue_id())
    f.write(body)
    clock_now = store.reactor.seconds() if at is None else at
    d = f.commit(envelope(*rcpts, received_at=clock_now), b"Received: x\r\n")
    result = []
    d.addBoth(result.append)
    [qid] = result
    if not isinstance(qid, str):
        qid.raiseException()
    return qid


def claimed(store, limit=100):
    out = []
    store.claim(limit).addBoth(out.append)
    [entries] = out
    return entries


def row(store, qid):
    return store.connections.run(
        lambda c: c.execute(
            "SELECT status, attempts, lease_owner, lease_until FROM queue_entries WHERE id = %s",
            (qid,),
        ).fetchone()
    )


def test_the_store_provides_its_seams(nodes, tmp_path):
    store = nodes(tmp=tmp_path)
    assert verifyObject(IQueueStore, store)
    f = store.open(store.new_queue_id())
    assert verifyObject(ISpoolFile, f)
    f.write(MESSAGE)
    assert verifyObject(IMessageBody, f.body())
    f.abort()
    qid = commit(store, "bob@remote.test")
    [entry] = claimed(store)
    assert entry.qid == qid and verifyObject(IMessageBody, entry.body)


def test_a_committed_message_reads_back_from_postgresql(nodes, tmp_path):
    store = nodes(tmp=tmp_path, memory_limit=1024)
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n"
    big = big + b"y" * (2 * 1024 * 1024 + 123) + b"\r\n"
    qid = commit(store, "bob@remote.test", body=big)
    assert list(tmp_path.iterdir()) == []  # the spill file went with the commit
    [entry] = claimed(store)
    assert entry.qid == qid and not entry.body.in_memory  # spilled: read from PostgreSQL
    assert entry.body.size == len(b"Received: x\r\n") + len(big)
    assert b"".join(entry.body.chunks(100000)) == b"Received: x\r\n" + big
    assert entry.body.header_block() == b"Received: x\r\nSubject: big\r\n"
    out = tmp_path / "copy"
    with open(out, "wb") as f:
        assert entry.body.copy_into(f.fileno(), b"X: 1\r\n") == 6 + entry.body.size
    assert out.read_bytes() == b"X: 1\r\nReceived: x\r\n" + big
    chunks = store.connections.run(
        lambda c: c.execute("SELECT count(*) FROM queue_bodies WHERE entry_id = %s", (qid,))
    ).fetchone()[0]
    assert chunks == 3  # 1 MiB chunks: never held whole


@pytest.mark.parametrize("memory_limit", [1 << 20, 1024])  # held in memory; spilled
def test_forged_header_fields_are_removed_before_the_commit(nodes, tmp_path, memory_limit):
    """ISpoolFile.remove_headers on the PostgreSQL spool (a forged Authentication-
    Results naming us goes before the message is queued), in memory and spilled."""
    from mta.headers import HeaderMatch

    store = nodes(tmp=tmp_path, memory_limit=memory_limit)
    body = b"y" * 5000 + b"\r\n"
    message = b"Authentication-Results: mx.test; spf=pass\r\nSubject: s\r\n\r\n" + body
    f = store.open(store.new_queue_id())
    f.write(message)
    removed = []
    f.remove_headers((HeaderMatch("Authentication-Results", "mx.test"),)).addBoth(removed.append)
    assert removed == [1]
    assert f.size == len(b"Subject: s\r\n\r\n" + body)
    d = f.commit(envelope("bob@remote.test"), b"Received: x\r\n")
    qid = []
    d.addBoth(qid.append)
    [entry] = claimed(store)
    assert entry.qid == qid[0]
    assert b"".join(entry.body.chunks()) == b"Received: x\r\nSubject: s\r\n\r\n" + body


class Agent:
    """Defers everything on the first attempt, delivers on the second; fails `bad`."""

    def __init__(self, bad=()):
        self.calls = []
        self.bad = set(bad)

    def deliver(self, job, recipients):
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


def test_the_runner_runs_on_the_postgresql_store(nodes):
    clock = ThreadClock()
    store = nodes(clock=clock)
    agent = Agent(bad={"bad@remote.test"})
    runner = QueueRunner(store, store.recording_agent(agent), clock, (30.0,), 1000.0, 5)
    runner.startService()
    qid = commit(store, "bob@remote.test")
    [(got, attempts, data)] = agent.calls
    assert (got, attempts) == (qid, 0)
    assert data == b"Received: x\r\n" + MESSAGE
    assert row(store, qid)[:3] == ("active", 1, None)  # deferred: lease ended
    clock.advance(30)
    assert [c[:2] for c in agent.calls] == [(qid, 0), (qid, 1)]
    assert row(store, qid) is None  # finished: gone
    bad = commit(store, "bad@remote.test")
    status, attempts, owner, _ = row(store, bad)
    assert (status, owner) == ("dead", None)
    runner.stopService()


def test_claims_are_leased_and_an_expired_lease_goes_to_another_node(nodes):
    a, b = nodes("a", window=0, lease=60.0), nodes("b", lease=60.0)
    qid = commit(a, "bob@remote.test")
    [entry] = claimed(a)
    assert entry.qid == qid and not entry.recovered
    assert row(a, qid)[2:] == ("a.test/1/x", 60.0)  # lease from the injected clock
    assert claimed(b) == []  # leased to a
    b.reactor.advance(59)
    b._maybe_due = True
    assert claimed(b) == []  # not yet expired
    b.reactor.advance(2)
    b._maybe_due = True
    [taken] = claimed(b)  # a died: its lease expired
    assert taken.qid == qid and taken.recovered and taken.job().may_be_delivered
    assert row(b, qid)[2:] == ("b.test/1/x", 121.0)
    # a comes back and tries to finish: it no longer owns the entry, nothing changes.
    a.finish(entry)
    assert row(a, qid)[2] == "b.test/1/x"
    b.finish(taken)
    assert row(b, qid) is None


def test_renewals_keep_a_lease_while_delivering(nodes):
    a, b = nodes("a", window=0, lease=30.0), nodes("b", lease=30.0)
    commit(a, "bob@remote.test")
    [entry] = claimed(a)
    for _ in range(6):  # a delivers for 60 s, renewing every 10 s
        a.reactor.advance(10)
        a.maintain()
        b.reactor.advance(10)
        b._maybe_due = True
        assert claimed(b) == []
    assert row(a, entry.qid)[3] == 90.0


def test_two_nodes_racing_never_claim_the_same_entry(nodes):
    a, b = nodes("a", window=0), nodes("b", window=0)
    qids = {commit(a, "bob@remote.test") for _ in range(60)}
    got = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def race(name, store):
        barrier.wait()
        while True:
            store._maybe_due = True
            entries = claimed(store, 3)
            if not entries:
                return
            got[name].extend(e.qid for e in entries)

    threads = [threading.Thread(target=race, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == sorted(qids)


class HalfAgent:
    """Delivers the first recipient, defers the others; counts deliveries."""

    def __init__(self):
        self.delivered = []

    def deliver(self, job, recipients):
        out = []
        for r in recipients:
            if r.domain == "one.test":
                self.delivered.append((job.qid, str(r)))
                out.append(DeliveryResult.delivered(r, "250 ok"))
            else:
                out.append(DeliveryResult.deferred(r, "451 later"))
        return succeed(out)


def test_a_recipient_delivered_is_not_delivered_again_after_the_node_dies(nodes):
    a, b = nodes("a", window=0), nodes("b")
    qid = commit(a, "x@one.test", "y@two.test")
    [entry] = claimed(a)
    agent = HalfAgent()
    results = []
    a.recording_agent(agent).deliver(entry.job(), entry.pending_recipients()).addBoth(
        results.append
    )
    assert len(results[0]) == 2 and agent.delivered == [(qid, "x@one.test")]
    # a dies here: no defer, no finish.  Its lease expires; b takes over.
    b.reactor.advance(61)
    b._maybe_due = True
    [taken] = claimed(b)
    assert taken.states == [RecipientState.DELIVERED, RecipientState.PENDING]
    assert taken.pending_recipients() == [Address("y", "two.test")]
    assert taken.details[0] == "250 ok"


def test_results_are_recorded_per_destination_as_each_returns(nodes):
    from twisted.internet.defer import Deferred

    a = nodes("a", window=0)
    qid = commit(a, "x@one.test", "y@two.test")
    [entry] = claimed(a)
    calls = []

    class SlowAgent:
        def deliver(self, job, recipients):
            d = Deferred()
            calls.append((list(recipients), d))
            return d

    a.recording_agent(SlowAgent()).deliver(entry.job(), entry.pending_recipients())
    assert [[str(r) for r in rcpts] for rcpts, _ in calls] == [["x@one.test"], ["y@two.test"]]
    (one, d_one), (_, d_two) = calls
    d_one.callback([DeliveryResult.delivered(one[0], "250 ok")])  # two.test still busy

    def states():
        return a.connections.run(
            lambda c: c.execute(
                "SELECT status FROM queue_recipients WHERE entry_id = %s ORDER BY position",
                (qid,),
            ).fetchall()
        )

    assert states() == [("delivered",), ("pending",)]
    quarantined = entry.job()
    quarantined = type(quarantined)(
        quarantined.qid,
        attrs_evolve(quarantined.envelope, quarantine="spam"),
        quarantined.body,
    )
    calls.clear()
    a.recording_agent(SlowAgent()).deliver(quarantined, list(quarantined.envelope.recipients))
    assert len(calls) == 1 and len(calls[0][0]) == 2  # one quarantined copy


class NotifyClock(ThreadClock):
    """A clock whose callFromThread (the listener thread's way in) sets an event."""

    def __init__(self):
        super().__init__()
        self.called = threading.Event()
        self.lock = threading.RLock()

    def callFromThread(self, f, *args, **kwargs):
        with self.lock:
            f(*args, **kwargs)
        self.called.set()


def test_listen_notify_wakes_an_idle_node(nodes):
    clock = NotifyClock()
    idle = nodes("idle", clock=clock, listen=True)
    woken = []
    idle.on_ready = lambda: woken.append(idle._maybe_due)
    idle.listener.start()
    assert idle.listener.connected.wait(30), "the listener did not connect"
    assert clock.called.wait(30)  # the (re)connect itself is announced once
    woken.clear()
    idle._maybe_due = False
    clock.called.clear()
    busy = nodes("busy", window=0)  # leases nothing to itself: others are told
    qid = commit(busy, "bob@remote.test")
    assert clock.called.wait(30), "no notification arrived"
    with clock.lock:
        assert woken == [True]
        [entry] = claimed(idle)
    assert entry.qid == qid
    idle.listener.stop()


def test_a_killed_connection_fails_clearly_then_recovers(nodes, dsn):
    store = nodes("a", window=0)
    commit(store, "bob@remote.test")
    assert terminate_backends(dsn) >= 1
    f = store.open(store.new_queue_id())
    f.write(MESSAGE)
    outcome = []
    f.commit(envelope("bob@remote.test"), b"").addBoth(outcome.append)
    [failure] = outcome
    assert failure.check(QueueUnavailable)
    assert "PostgreSQL queue at postgresql://127.0.0.1:5432/test_pgq_" in str(failure.value)
    assert "failed" in str(failure.value)
    qid = commit(store, "carol@remote.test")  # a fresh connection: service resumes
    store._maybe_due = True
    assert [e.qid for e in claimed(store)][-1] == qid
    assert len(claimed(store)) == 0


def test_claims_while_postgresql_is_unreachable_find_nothing_and_retry(nodes, dsn):
    store = nodes("a", window=0)
    store.connections.dsn = "postgresql://postgres@127.0.0.1:1/none"
    store._maybe_due = True
    ready = []
    store.on_ready = lambda: ready.append(True)
    assert claimed(store) == []
    assert not store._maybe_due  # the runner is not asked to spin
    store.reactor.advance(store.poll_interval)
    assert ready and store._maybe_due  # looked again on the slow poll


def test_depth_and_heartbeat(nodes):
    a = nodes("a", window=1)
    commit(a, "one@remote.test")  # leased to a, kept for its runner
    commit(a, "two@remote.test")  # beyond the window: ready for any node
    a.maintain()
    depth = a.depth()
    assert depth["incoming"] == 1 and depth["active"] == 1 and depth["ready"] == 1
    assert a.backlog() == 2
    assert "PostgreSQL queue at" in a.probe()
    [node] = a.connections.run(
        lambda c: c.execute("SELECT node_id, hostname, version FROM queue_nodes").fetchall()
    )
    assert node[:2] == ("a.test/1/x", "a.test")
