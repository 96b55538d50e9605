"""RelayDelivery against real in-process SMTP peers and a real loopback DNS server."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from mta.config import DNSConfig
from mta.delivery.mx import MXResolver
from mta.delivery.relay import RelayDelivery
from mta.dns import make_resolver
from mta.envelope import Address, Envelope, RecipientState
from mta.interfaces import IDeliveryAgent
from mta.queue.entry import QueueEntry
from tests.dnsserver import start_dns_server
from tests.peers import PeerConfig, self_signed_server_context, start_peer

BODY = b"Subject: relay\r\n\r\n.leading dot\r\nhello\r\n"
TRACE = b"Received: from client by mx.example.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"


def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def world(tmp_path):
    """DNS with one domain per peer kind; peers started on demand by `peer(name, cfg)`."""
    server = start_dns_server(reactor())
    zone = server.zone("test")
    peers = []

    def peer(domain, config=None, mx_count=1):
        p = start_peer(reactor(), config)
        peers.append(p)
        for i in range(mx_count):
            zone.mx(domain, 10 * (i + 1), f"mx{i}.{domain}")
            zone.a(f"mx{i}.{domain}", "127.0.0.1")
        return p

    yield server, zone, peer
    for p in peers:
        p.stop()
    pytest_twisted.blockon(server.stop())


def relay_for(server, port, clock=None, **kw):
    r = make_resolver(DNSConfig(nameservers=(server.address,), timeout=5.0), reactor())
    mx = MXResolver(r, clock or reactor(), port=port)
    relay = RelayDelivery(mx, reactor(), helo="mx.example.test", **kw)
    relay.startService()
    return relay


def entry(tmp_path, *rcpts, qid="0123abcd"):
    path = tmp_path / qid
    path.write_bytes(BODY + b"METADATA-AND-FOOTER")
    env = Envelope(Address("alice", "example.test"), tuple(rcpts))
    return QueueEntry(qid, env, str(path), len(BODY), trace_headers=TRACE)


def by_rcpt(results):
    return {str(r.recipient): r for r in results}


def test_interface():
    mx = MXResolver(None, task.Clock())
    assert verifyObject(IDeliveryAgent, RelayDelivery(mx, task.Clock(), helo="x"))


@pytest_twisted.ensureDeferred
async def test_delivered_with_trace_headers_and_dot_stuffing(world, tmp_path):
    server, zone, peer = world
    p = peer("ok.test")
    relay = relay_for(server, p.port)
    rcpts = [Address("bob", "ok.test"), Address("carol", "ok.test")]
    results = await relay.deliver(entry(tmp_path, *rcpts), rcpts)
    assert {r.state for r in results} == {RecipientState.DELIVERED}
    assert "250 2.0.0 queued" in results[0].detail
    [msg] = p.messages
    assert msg.content == TRACE + BODY
    assert msg.recipients == ["bob@ok.test", "carol@ok.test"]
    assert msg.sender == "alice@example.test"
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_per_recipient_5xx_and_4xx(world, tmp_path):
    server, zone, peer = world
    cfg = PeerConfig(
        rcpt_replies={
            "gone@mixed.test": b"550 5.1.1 no such user",
            "busy@mixed.test": b"452 4.2.2 mailbox full",
        }
    )
    p = peer("mixed.test", cfg)
    relay = relay_for(server, p.port)
    rcpts = [
        Address("ok", "mixed.test"),
        Address("gone", "mixed.test"),
        Address("busy", "mixed.test"),
    ]
    out = by_rcpt(await relay.deliver(entry(tmp_path, *rcpts), rcpts))
    assert out["ok@mixed.test"].state is RecipientState.DELIVERED
    assert out["gone@mixed.test"].state is RecipientState.FAILED
    assert out["gone@mixed.test"].reply.enhanced == "5.1.1"
    assert out["busy@mixed.test"].state is RecipientState.DEFERRED
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_4xx_to_mail_tries_next_mx_then_defers(world, tmp_path):
    server, zone, peer = world
    p = peer("later.test", PeerConfig(mail_reply=b"421 4.3.2 try later"), mx_count=2)
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "later.test")
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert r.state is RecipientState.DEFERRED and "4.3.2" in r.detail
    assert p.connections == 2  # both MX hosts were tried
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_nxdomain_and_null_mx_fail(world, tmp_path):
    server, zone, peer = world
    zone.null_mx("null.test")
    relay = relay_for(server, 9)
    rcpts = [Address("a", "null.test"), Address("b", "nowhere.test")]
    out = by_rcpt(await relay.deliver(entry(tmp_path, *rcpts), rcpts))
    assert out["a@null.test"].state is RecipientState.FAILED
    assert out["a@null.test"].reply.enhanced == "5.1.10"
    assert out["b@nowhere.test"].state is RecipientState.FAILED


@pytest_twisted.ensureDeferred
async def test_connection_refused_defers_and_remembers(world, tmp_path):
    server, zone, peer = world
    zone.mx("down.test", 10, "mx.down.test").a("mx.down.test", "127.0.0.1")
    from tests.conftest import free_port

    clock = task.Clock()
    relay = relay_for(server, free_port(), clock=clock)
    rcpt = Address("bob", "down.test")
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert r.state is RecipientState.DEFERRED and "connect" in r.detail
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert "recently unreachable" in r.detail


@pytest_twisted.ensureDeferred
async def test_close_mid_data_defers(world, tmp_path):
    server, zone, peer = world
    p = peer("flaky.test", PeerConfig(close_after_data_bytes=10))
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "flaky.test")
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert r.state is RecipientState.DEFERRED and "lost connection" in r.detail
    assert p.messages == []


@pytest_twisted.ensureDeferred
async def test_starttls_with_self_signed_certificate(world, tmp_path):
    server, zone, peer = world
    ctx = self_signed_server_context(tmp_path / "peer-tls")
    p = peer("tls.test", PeerConfig(tls_context=ctx))
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "tls.test")
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    assert p.messages[0].tls
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_tls_required_refuses_cleartext(world, tmp_path):
    server, zone, peer = world
    p = peer("plain.test")
    relay = relay_for(server, p.port, tls="required")
    rcpt = Address("bob", "plain.test")
    [r] = await relay.deliver(entry(tmp_path, rcpt), [rcpt])
    assert r.state is RecipientState.DEFERRED and "4.7.10" in r.detail
    assert p.messages == []


@pytest_twisted.ensureDeferred
async def test_connection_reused_and_idle_closed(world, tmp_path):
    server, zone, peer = world
    p = peer("reuse.test")
    relay = relay_for(server, p.port, idle_timeout=0.2)
    rcpt = Address("bob", "reuse.test")
    for qid in ("00000001", "00000002", "00000003"):
        [r] = await relay.deliver(entry(tmp_path, rcpt, qid=qid), [rcpt])
        assert r.state is RecipientState.DELIVERED
    assert p.connections == 1 and len(p.messages) == 3
    assert p.commands.count(b"RSET") == 2
    assert relay.idle_connections() == 1
    for _ in range(200):
        if b"QUIT" in p.commands:
            break
        await task.deferLater(reactor(), 0.02, lambda: None)
    assert relay.idle_connections() == 0 and b"QUIT" in p.commands


@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_share_a_limit(world, tmp_path):
    server, zone, peer = world
    p = peer("busy.test")
    relay = relay_for(server, p.port, destination_concurrency=2)
    rcpt = Address("bob", "busy.test")
    ds = [relay.deliver(entry(tmp_path, rcpt, qid=f"{i:08x}"), [rcpt]) for i in range(6)]
    results = await defer.gatherResults(ds)
    assert all(r[0].state is RecipientState.DELIVERED for r in results)
    assert len(p.messages) == 6 and p.connections <= 2
    await relay.stopService()
