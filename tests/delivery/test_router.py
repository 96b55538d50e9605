"""Router: local vs remote split, remote not configured, failing agents."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from zope.interface.verify import verifyObject

from mta.delivery.router import Router
from mta.envelope import Address, DeliveryResult, RecipientState
from mta.interfaces import IDeliveryAgent
from mta.queue.entry import QueueEntry
from tests.queue.doubles import envelope


class Recorder:
    def __init__(self, result=None):
        self.calls = []
        self.result = result

    def deliver(self, entry, recipients):
        self.calls.append(list(recipients))
        if self.result is not None:
            return self.result
        return succeed([DeliveryResult.delivered(r) for r in recipients])


def entry(*rcpts):
    return QueueEntry("00aa", envelope(*rcpts), "/nonexistent", 0)


def run(router, e):
    out = []
    router.deliver(e, e.pending_recipients()).addCallback(out.append)
    return {str(r.recipient): r for r in out[0]}


def test_interface():
    assert verifyObject(IDeliveryAgent, Router(["example.test"], Recorder()))


def test_splits_by_domain():
    local, remote = Recorder(), Recorder()
    router = Router(["Example.Test"], local, remote)
    results = run(router, entry("a@example.test", "b@far.test", "c@EXAMPLE.test"))
    assert local.calls == [[Address("a", "example.test"), Address("c", "EXAMPLE.test")]]
    assert remote.calls == [[Address("b", "far.test")]]
    assert all(r.state is RecipientState.DELIVERED for r in results.values())


def test_remote_not_configured_defers():
    local = Recorder()
    results = run(Router(["example.test"], local), entry("a@example.test", "b@far.test"))
    assert results["a@example.test"].state is RecipientState.DELIVERED
    assert results["b@far.test"].state is RecipientState.DEFERRED
    assert "remote delivery not configured" in results["b@far.test"].detail


def test_failing_agent_defers_its_recipients():
    local = Recorder(fail(RuntimeError("boom")))
    results = run(
        Router(["example.test"], local, Recorder()), entry("a@example.test", "b@far.test")
    )
    assert results["a@example.test"].state is RecipientState.DEFERRED
    assert results["b@far.test"].state is RecipientState.DELIVERED


def test_a_failing_agent_with_all_the_recipients_defers_them():
    local = Recorder(fail(RuntimeError("boom")))
    results = run(Router(["example.test"], local), entry("a@example.test", "b@example.test"))
    assert [r.state for r in results.values()] == [RecipientState.DEFERRED] * 2
    assert all("internal delivery error: boom" in r.detail for r in results.values())


def test_an_agent_raising_synchronously_defers_its_recipients():
    class Raising:
        def deliver(self, entry, recipients):
            raise RuntimeError("sync boom")

    results = run(Router(["example.test"], Raising()), entry("a@example.test"))
    assert results["a@example.test"].state is RecipientState.DEFERRED
    assert "sync boom" in results["a@example.test"].detail
