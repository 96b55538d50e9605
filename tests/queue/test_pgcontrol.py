"""`mta-admin queue ...` and `mta-admin cluster status` on the PostgreSQL queue, from
"another machine" (nothing but the DSN), while nodes hold entries."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from mta.admin.cli import main
from mta.envelope import DeliveryResult
from mta.interfaces import IQueueControl
from mta.queue.control import ControlError
from mta.queue.inspect import format_listing
from mta.queue.pgconn import Connections
from mta.queue.pgcontrol import PGQueueControl, hold_message
from mta.queue.pgstore import PGQueueStore
from tests.queue.conftest import empty_queue
from tests.queue.doubles import InlinePool, ThreadClock, envelope

MESSAGE = b"Subject: hello\r\nMessage-ID: <m@remote.test>\r\n\r\nbody\r\n"


@pytest.fixture
def node(dsn):
    empty_queue(dsn)
    clock = ThreadClock()
    clock.advance(1_000_000)
    store = PGQueueStore(
        Connections(dsn),
        clock,
        InlinePool(),
        spill_dir="/nonexistent",
        hostname="n1.example.test",
        node="n1.example.test/7/ab",
        window=0,
        listen=False,
    )
    yield store
    store.stop()
    store.connections.close()


def commit(store, *rcpts):
    f = store.open(store.new_queue_id())
    f.write(MESSAGE)
    out = []
    f.commit(envelope(*rcpts, received_at=store.reactor.seconds()), b"Received: x\r\n").addBoth(
        out.append
    )
    return out[0]


def claim(store):
    store._maybe_due = True
    out = []
    store.claim(10).addBoth(out.append)
    return out[0]


def test_list_show_and_actions(node, dsn):
    control = PGQueueControl(dsn, clock=node.reactor.seconds)  # the nodes' time
    assert verifyObject(IQueueControl, control)
    first = commit(node, "bob@remote.test", "carol@remote.test")
    second = commit(node, "dave@remote.test")
    [entry, _] = claim(node)
    node.recording_agent(_Agent()).deliver(entry.job(), entry.pending_recipients())
    entry.attempts, entry.next_attempt = 1, node.reactor.seconds() + 600
    entry.states[1] = entry.states[1].DEFERRED
    node.defer(entry, entry.next_attempt)

    listed = {s.qid: s for s in control.list()}
    assert set(listed) == {first, second}
    assert listed[first].state == "deferred"
    assert [(r.address, r.state) for r in listed[first].recipients] == [
        ("bob@remote.test", "delivered"),
        ("carol@remote.test", "deferred"),
    ]
    assert "bob@remote.test  [delivered]" in format_listing(control.list())
    shown = control.show(first)
    assert "Subject: hello" in shown and "Received: x" in shown
    assert "<carol@remote.test> [deferred]" in shown and "PostgreSQL queue at" in shown
    assert "Leased to:  n1.example.test/7/ab" in control.show(second)

    assert control.act("hold", first) == f"{first} held"
    assert [s.state for s in control.list() if s.qid == first] == ["hold"]
    with pytest.raises(ControlError, match="is not in the active queue"):
        control.act("hold", first)
    assert control.act("release", first) == f"{first} released"
    assert control.act("retry", second).startswith(f"{second} is already being tried")
    assert control.act("flush") == "0 deferred message(s) scheduled now"
    assert control.act("delete", first) == f"{first} deleted (was active)"
    with pytest.raises(ControlError, match="no such message"):
        control.show(first)
    with pytest.raises(ControlError, match="is not a queue id"):
        control.act("delete", "../etc")
    control.close()


def test_requeue_a_dead_letter_and_hold_for_quarantine(node, dsn):
    control = PGQueueControl(dsn, clock=node.reactor.seconds)
    qid = commit(node, "bob@remote.test")
    [entry] = claim(node)
    entry.states[0] = entry.states[0].FAILED
    entry.details[0] = "550 5.1.1 no such user"
    node.bury(entry, "550 5.1.1 no such user")
    assert [(s.qid, s.state, s.last_error) for s in control.list(dead=True)] == [
        (qid, "dead", "550 5.1.1 no such user")
    ]
    assert control.list(dead=False) == []
    assert control.act("requeue", qid) == f"{qid} requeued"
    [again] = claim(node)
    assert again.qid == qid and again.pending_recipients()[0].local == "bob"
    held = hold_message(dsn, envelope("eve@example.test"), MESSAGE, b"X-Released: yes\r\n")
    assert [s.state for s in control.list() if s.qid == held] == ["hold"]
    assert "X-Released: yes" in control.show(held)
    control.close()


def test_an_unreachable_queue_is_a_clear_control_error():
    control = PGQueueControl("postgresql://postgres@127.0.0.1:1/none")
    with pytest.raises(ControlError, match="PostgreSQL queue at postgresql://127.0.0.1:1/none"):
        control.list()


def test_cluster_status_lists_live_nodes_their_leases_and_versions(node, dsn, tmp_path, capsys):
    node.maintain()
    commit(node, "bob@remote.test")
    claim(node)
    config = tmp_path / "mta.toml"
    config.write_text(
        f'datadir = "{tmp_path}"\n[queue]\nbackend = "postgresql"\n[database]\ndsn = "{dsn}"\n'
    )
    # The node's clock is far from now: its heartbeat is old, so it counts as gone
    # unless --stale says otherwise.
    assert main(["--config", str(config), "cluster", "status", "--stale", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "n1.example.test/7/ab" in out and "live" in out and "1 live node(s)" in out
    assert main(["--config", str(config), "cluster", "status"]) == 0
    assert "gone" in capsys.readouterr().out
    local = tmp_path / "local.toml"
    local.write_text(f'datadir = "{tmp_path}"\n')
    assert main(["--config", str(local), "cluster", "status"]) == 1
    assert 'backend = "postgresql"' in capsys.readouterr().err


class _Agent:
    def deliver(self, job, recipients):
        from twisted.internet.defer import succeed

        return succeed(
            [
                DeliveryResult.delivered(r, "250 ok")
                if r.local == "bob"
                else DeliveryResult.deferred(r, "451 later")
                for r in recipients
            ]
        )
