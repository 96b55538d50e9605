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


# -- issue #11: UTF-8 headers, 8BITMIME, who said what, line endings -------------------

UTF8_HEADERS = (
    "From: Jörg Müller <joerg@example.test>\r\n"
    "To: Zoë <bob@plain.test>\r\n"
    "Subject: Grüße aus Köln\r\n"
    "Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    "Message-ID: <utf8@example.test>\r\n"
).encode()
UTF8_BODY = "\r\nBody with 8-bit text: naïve café\r\n.\r\nafter the dot\r\n".encode()


def entry_with(tmp_path, body, *rcpts, qid="0123abcd", **envelope):
    path = tmp_path / qid
    path.write_bytes(body + b"METADATA-AND-FOOTER")
    env = Envelope(Address("alice", "example.test"), tuple(rcpts), **envelope)
    return QueueEntry(qid, env, str(path), len(body), trace_headers=TRACE)


def mail_command(peer) -> bytes:
    [mail] = [c for c in peer.commands if c.startswith(b"MAIL")]
    return mail


NO_UTF8 = PeerConfig(extensions=("PIPELINING", "8BITMIME", "SIZE 10485760"))


@pytest_twisted.ensureDeferred
async def test_utf8_headers_are_downgraded_for_a_peer_without_smtputf8(world, tmp_path):
    import email
    import email.policy

    server, zone, peer = world
    p = peer("plain.test", NO_UTF8)
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "plain.test")
    job = entry_with(tmp_path, UTF8_HEADERS + UTF8_BODY, rcpt, smtputf8=True)
    [r] = await relay.deliver(job, [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    [msg] = p.messages
    end = msg.content.index(b"\r\n\r\n") + 2
    head, rest = msg.content[:end], msg.content[end:]
    assert head.isascii()  # RFC 6532: no raw UTF-8 outside an SMTPUTF8 transaction
    assert head.startswith(TRACE)
    assert b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\nMessage-ID: <utf8@example.test>" in head
    assert rest == UTF8_BODY  # the body streams unchanged, its dot line included
    parsed = email.message_from_bytes(msg.content, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Grüße aus Köln"
    assert str(parsed["From"]) == "Jörg Müller <joerg@example.test>"
    assert str(parsed["To"]) == "Zoë <bob@plain.test>"
    # No SMTPUTF8 (not offered); BODY=8BITMIME for the 8-bit body; SIZE as sent.
    assert mail_command(p) == (
        b"MAIL FROM:<alice@example.test> SIZE=%d BODY=8BITMIME" % len(msg.content)
    )
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_a_non_ascii_address_in_a_header_fails_5_6_7_without_a_transaction(world, tmp_path):
    server, zone, peer = world
    p = peer("plain.test", NO_UTF8)
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "plain.test")
    body = b"From: alice@example.test\r\nCc: " + "jörg@example.test".encode() + b"\r\n\r\nhi\r\n"
    [r] = await relay.deliver(entry_with(tmp_path, body, rcpt, smtputf8=True), [rcpt])
    assert r.state is RecipientState.FAILED  # the queue bounces it
    assert r.reply.code == 554 and r.reply.enhanced == "5.6.7"
    assert "SMTPUTF8 is required, but was not offered by mx0.plain.test[127.0.0.1]" in r.detail
    assert "cannot be downgraded" in r.detail and "jörg@example.test" in r.detail
    assert r.remote_mta is None and "said" not in r.detail  # our decision, not the peer's
    assert not any(c.startswith(b"MAIL") for c in p.commands) and p.messages == []
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_utf8_headers_go_as_they_are_with_smtputf8_and_8bitmime(world, tmp_path):
    server, zone, peer = world
    p = peer("utf8.test")  # offers SMTPUTF8 and 8BITMIME
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "utf8.test")
    body = UTF8_HEADERS + b"\r\nascii body\r\n"
    [r] = await relay.deliver(entry_with(tmp_path, body, rcpt, smtputf8=True), [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    assert p.messages[0].content == TRACE + body
    # The UTF-8 header fields are 8-bit content although nobody declared BODY=8BITMIME.
    assert mail_command(p) == (
        b"MAIL FROM:<alice@example.test> SIZE=%d BODY=8BITMIME SMTPUTF8" % len(TRACE + body)
    )
    await relay.stopService()


@pytest.mark.parametrize(
    "body, declared",
    [
        (b"Subject: x\r\n\r\n" + "café\r\n".encode(), b" BODY=8BITMIME"),
        (b"Subject: x\r\n\r\nplain ascii\r\n", b""),
    ],
)
@pytest_twisted.ensureDeferred
async def test_undeclared_8bit_content_is_declared_8bitmime(world, tmp_path, body, declared):
    server, zone, peer = world
    p = peer("eight.test")
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "eight.test")
    [r] = await relay.deliver(entry_with(tmp_path, body, rcpt), [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    assert mail_command(p) == b"MAIL FROM:<alice@example.test> SIZE=%d%s" % (
        len(TRACE + body),
        declared,
    )
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_a_downgraded_message_is_signed_after_the_downgrade(world, tmp_path):
    import dkim

    from mta.admin import dkim as keys
    from mta.config import DKIMConfig
    from mta.delivery.dkim import DKIMSigner
    from tests.queue.doubles import InlinePool

    pem, public = keys.generate_key(1024)
    keys.write_key(str(tmp_path / "dkim"), "example.test", "s1", pem)
    signer = DKIMSigner(
        DKIMConfig(selector="s1", domains=("example.test",)),
        str(tmp_path / "dkim"),
        InlinePool(),
        reactor(),
    )
    server, zone, peer = world
    p = peer("plain.test", NO_UTF8)
    relay = relay_for(server, p.port, signer=signer)
    rcpt = Address("bob", "plain.test")
    job = entry_with(tmp_path, UTF8_HEADERS + UTF8_BODY, rcpt, smtputf8=True)
    [r] = await relay.deliver(job, [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    [msg] = p.messages
    assert msg.content.startswith(b"DKIM-Signature: ") and msg.content.isascii() is False
    assert msg.content.partition(b"\r\n\r\n")[0].isascii()
    assert mail_command(p).split()[2] == b"SIZE=%d" % len(msg.content)

    def dnsfunc(name, timeout=5):
        wanted = b"s1._domainkey.example.test."
        return keys.txt_value(public).encode() if name == wanted else b""

    assert dkim.verify(msg.content, dnsfunc=dnsfunc)  # over the bytes that were sent
    await relay.stopService()


@pytest_twisted.ensureDeferred
async def test_results_say_who_said_it(world, tmp_path):
    server, zone, peer = world
    p = peer("mixed.test", PeerConfig(rcpt_replies={"gone@mixed.test": b"550 5.1.1 no such user"}))
    relay = relay_for(server, p.port)
    rcpts = [Address("gone", "mixed.test"), Address("ok", "mixed.test")]
    out = by_rcpt(await relay.deliver(entry(tmp_path, *rcpts), rcpts))
    gone = out["gone@mixed.test"]
    assert gone.remote_mta == "mx0.mixed.test"
    assert gone.peer_reply == gone.reply
    assert gone.detail == f"mx0.mixed.test[127.0.0.1]:{p.port} said: 550 5.1.1 no such user"
    assert out["ok@mixed.test"].remote_mta == "mx0.mixed.test"
    # A refusal of our own (the peer lacks SMTPUTF8 for a UTF-8 address) names no peer.
    utf8 = Address("jörg", "mixed.test")
    [r] = await relay.deliver(entry(tmp_path, utf8, qid="00000002"), [utf8])
    assert r.state is RecipientState.DELIVERED  # this peer offers SMTPUTF8 ...
    q = peer("old.test", NO_UTF8)
    relay2 = relay_for(server, q.port)
    utf8 = Address("jörg", "old.test")
    job = entry_with(tmp_path, BODY, utf8, qid="00000003", smtputf8=True)
    [r] = await relay2.deliver(job, [utf8])
    assert r.state is RecipientState.FAILED and r.reply.enhanced == "5.6.7"
    assert r.remote_mta is None and r.peer_reply is None and "said" not in r.detail
    await relay.stopService()
    await relay2.stopService()


@pytest_twisted.ensureDeferred
async def test_dns_and_connection_failures_name_no_peer(world, tmp_path):
    server, zone, peer = world
    from tests.conftest import free_port

    relay = relay_for(server, free_port())
    rcpts = [Address("a", "nowhere.test"), Address("b", "[127.0.0.1]")]
    out = by_rcpt(await relay.deliver(entry(tmp_path, *rcpts), rcpts))
    for r in out.values():
        assert r.remote_mta is None and r.peer_reply is None and "said" not in r.detail
    # An address literal names the address once (not "[127.0.0.1][127.0.0.1]").
    literal = out["b@[127.0.0.1]"].detail
    assert "connect to [127.0.0.1]:" in literal and "][" not in literal


@pytest_twisted.ensureDeferred
async def test_a_line_with_a_single_dot_arrives_in_one_message(world, tmp_path):
    server, zone, peer = world
    p = peer("dots.test")
    relay = relay_for(server, p.port)
    rcpt = Address("bob", "dots.test")
    body = (
        b"Subject: dots\r\n\r\nbefore\r\n.\r\nMAIL FROM:<evil@example.test>\r\n"
        b"RCPT TO:<victim@dots.test>\r\nDATA\r\n.\r\n..\r\nafter\r\n"
    )
    [r] = await relay.deliver(entry_with(tmp_path, body, rcpt), [rcpt])
    assert r.state is RecipientState.DELIVERED, r.detail
    [msg] = p.messages  # ONE message, whole
    assert msg.content == TRACE + body
    assert [c for c in p.commands if c.startswith(b"MAIL")] == [
        b"MAIL FROM:<alice@example.test> SIZE=%d" % len(TRACE + body)
    ]
    await relay.stopService()
