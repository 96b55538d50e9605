"""End to end: `twistd mta` relays to real peers found through a real loopback DNS server.

One message with four remote recipients, one per destination domain, all MX hosts on
the same port (`[relay] port`) at different loopback addresses:

- dest.test   -> a private Postfix on 127.0.0.1 that stores it in a Maildir;
- tempfail.test -> a Twisted peer on 127.0.0.2 answering 451 to RCPT (stays queued,
  retried);
- reject.test -> a peer on 127.0.0.3 answering 550 to RCPT (recipient failed);
- tls.test    -> a peer on 127.0.0.4 offering STARTTLS with a self-signed certificate
  (delivered over TLS).

A second test relays to a Postfix configured without SMTPUTF8: a message submitted
with SMTPUTF8 arrives with its UTF-8 header fields downgraded, DKIM-valid, whole
despite a line holding a single dot; and a queued body with bare LF line ends (which
Postfix 3.7 takes for line ends) cannot smuggle a second message.

The DNS server and the Twisted peers run on this process's reactor, so the test
waits asynchronously (pytest_twisted), never with a blocking sleep.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import task

from tests.conftest import free_port, require_tool
from tests.dnsserver import start_dns_server
from tests.peers import PeerConfig, PostfixPeer, self_signed_server_context, start_peer

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0

MESSAGE = (
    b"From: alice@example.test\r\n"
    b"To: bob@dest.test\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Subject: relay e2e\r\n"
    b"Message-ID: <relay-e2e@example.test>\r\n"
    b"\r\n"
    b"Hello, world.\r\n"
    b".a line with a leading dot\r\n"
)


def reactor():
    from twisted.internet import reactor

    return reactor


def common_port(hosts: list[str]) -> int:
    """A port free on every one of `hosts` a moment ago."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


async def wait_until(predicate, what: str, timeout: float = TIMEOUT):
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await task.deferLater(reactor(), 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def postfix():
    require_tool("postfix")
    # A short root: Postfix's unix sockets live under it (sun_path is ~108 bytes).
    root = Path(tempfile.mkdtemp(prefix="mta-pf-"))
    peer = PostfixPeer(root, 0)
    yield peer
    peer.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_relay_to_postfix_tempfail_reject_and_tls(tmp_path, mta_server_factory, postfix):
    port = common_port(["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"])
    dns = start_dns_server(reactor())
    zone = dns.zone("test")
    peers = []
    try:
        for domain, host in (
            ("dest.test", "127.0.0.1"),
            ("tempfail.test", "127.0.0.2"),
            ("reject.test", "127.0.0.3"),
            ("tls.test", "127.0.0.4"),
        ):
            zone.mx(domain, 10, f"mx.{domain}").a(f"mx.{domain}", host)
        postfix.port = port
        postfix.start()
        tempfail = start_peer(
            reactor(),
            PeerConfig(rcpt_reply=b"451 4.3.0 try again later"),
            host="127.0.0.2",
            port=port,
        )
        reject = start_peer(
            reactor(), PeerConfig(rcpt_reply=b"550 5.1.1 no such user"), host="127.0.0.3", port=port
        )
        tls_ctx = self_signed_server_context(tmp_path / "peer-tls")
        tls = start_peer(reactor(), PeerConfig(tls_context=tls_ctx), host="127.0.0.4", port=port)
        peers = [tempfail, reject, tls]

        mta = mta_server_factory(
            {
                "relay_networks": ["127.0.0.0/8"],
                "dns": {"nameservers": [dns.address], "timeout": 5.0},
                "relay": {"port": port, "idle_timeout": 1.0},
                "queue": {"retry_schedule": [1.0]},
                "dkim": {"selector": "s1", "domains": ["example.test"]},
            },
            start=False,
        )
        # Outbound mail from example.test is DKIM-signed; publish the key in our DNS.
        keygen = mta.admin("dkim", "keygen", "example.test", "--selector", "s1")
        assert keygen.returncode == 0, keygen.stderr
        value = "".join(re.findall(r'"([^"]*)"', keygen.stdout))
        zone.txt(
            "s1._domainkey.example.test", *[value[i : i + 255] for i in range(0, len(value), 255)]
        )
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as client:
            refused = client.sendmail(
                "alice@example.test",
                ["bob@dest.test", "carl@tempfail.test", "dora@reject.test", "eve@tls.test"],
                MESSAGE,
            )
        assert refused == {}

        await wait_until(lambda: postfix.messages("bob@dest.test"), "Postfix to store the message")
        [stored] = postfix.messages("bob@dest.test")
        assert b"Subject: relay e2e" in stored
        assert b"\n.a line with a leading dot" in stored  # dot-stuffing undone by Postfix
        assert b"Received: from" in stored and b"by mx.example.test" in stored
        assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;" in stored
        await _verify_dkim(tmp_path, stored, dns.port)

        await wait_until(lambda: tls.messages, "the TLS peer to receive the message")
        assert tls.messages[0].tls and tls.messages[0].recipients == ["eve@tls.test"]

        await wait_until(
            lambda: any(c.startswith(b"RCPT") for c in reject.commands), "a RCPT at the 5xx peer"
        )
        await wait_until(
            lambda: "dora@reject.test" in _failed(mta.log()), "dora to fail permanently"
        )

        # 4xx: retried (retry_schedule 1 s) and still queued.
        await wait_until(
            lambda: sum(c.startswith(b"RCPT") for c in tempfail.commands) >= 2,
            "a retry at the 4xx peer",
        )
        assert tempfail.messages == []
        listing = mta.admin("queue", "list")
        assert "carl@tempfail.test" in listing.stdout, listing.stdout + listing.stderr
    finally:
        for p in peers:
            p.stop()
        postfix.stop()
        await dns.stop()


UTF8_MESSAGE = (
    "From: Jörg Müller <alice@example.test>\r\n"
    "To: Zoë <bob@dest.test>\r\n"
    "Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    "Subject: Grüße aus Köln\r\n"
    "Message-ID: <relay-utf8@example.test>\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Body with 8-bit text: naïve café\r\n"
    ".\r\n"
    "MAIL FROM:<evil@example.test>\r\n"
    "after the dot\r\n"
).encode()


@pytest.fixture
def postfix_no_utf8():
    require_tool("postfix")
    root = Path(tempfile.mkdtemp(prefix="mta-pf-"))
    peer = PostfixPeer(root, free_port(), smtputf8=False)
    yield peer
    peer.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_relay_to_postfix_without_smtputf8(tmp_path, mta_server_factory, postfix_no_utf8):
    """Issue #11: a message submitted with SMTPUTF8 (ASCII envelope, UTF-8 From and
    Subject, a line holding a single dot) reaches a Postfix with `smtputf8_enable =
    no` downgraded, DKIM-valid, and as ONE whole message; a queued
    body with bare LF line ends cannot end the DATA early either."""
    import email
    import email.policy

    postfix = postfix_no_utf8
    dns = start_dns_server(reactor())
    zone = dns.zone("test")
    try:
        zone.mx("dest.test", 10, "mx.dest.test").a("mx.dest.test", "127.0.0.1")
        postfix.start()
        mta = mta_server_factory(
            {
                "relay_networks": ["127.0.0.0/8"],
                "dns": {"nameservers": [dns.address], "timeout": 5.0},
                "relay": {"port": postfix.port, "idle_timeout": 1.0},
                "dkim": {"selector": "s1", "domains": ["example.test"]},
            },
            start=False,
        )
        keygen = mta.admin("dkim", "keygen", "example.test", "--selector", "s1")
        assert keygen.returncode == 0, keygen.stderr
        value = "".join(re.findall(r'"([^"]*)"', keygen.stdout))
        zone.txt(
            "s1._domainkey.example.test", *[value[i : i + 255] for i in range(0, len(value), 255)]
        )
        mta.start()
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            assert client.has_extn("smtputf8")
            refused = client.sendmail(
                "alice@example.test", ["bob@dest.test"], UTF8_MESSAGE, mail_options=["SMTPUTF8"]
            )
        assert refused == {}

        await wait_until(lambda: postfix.messages("bob@dest.test"), "Postfix to store the message")
        [stored] = postfix.messages("bob@dest.test")  # ONE message
        head, _, body = stored.partition(b"\n\n")
        assert head.isascii(), head  # downgraded: RFC 6532 forbids raw UTF-8 here
        parsed = email.message_from_bytes(stored, policy=email.policy.default)
        assert str(parsed["Subject"]) == "Grüße aus Köln"
        assert str(parsed["From"]) == "Jörg Müller <alice@example.test>"
        assert str(parsed["To"]) == "Zoë <bob@dest.test>"
        # The body arrived unchanged, its lone "." line and what follows included.
        assert body == UTF8_MESSAGE.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
        assert b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;" in stored
        await _verify_dkim(tmp_path, stored, dns.port)  # signed after the downgrade
        log = postfix.log()
        assert "message-id=<relay-utf8@example.test>" in log
        assert "evil@example.test" not in log  # no smuggled transaction
    finally:
        await dns.stop()

    await _bare_lf_reaches_postfix_as_one_message(tmp_path, postfix)


async def _bare_lf_reaches_postfix_as_one_message(tmp_path, postfix) -> None:
    """A queued body with bare LF (the session never queues one; an older queue
    entry might) against a Postfix that takes a bare LF as a line end: "\n.\n" must
    not end the DATA there."""
    from mta.delivery.mx import MXResolver
    from mta.delivery.relay import RelayDelivery
    from mta.envelope import Address, Envelope, RecipientState
    from mta.queue.entry import QueueEntry

    body = (
        b"Subject: bare line ends\r\n\r\nbefore\n.\nMAIL FROM:<evil2@example.test>\n"
        b"RCPT TO:<carl@dest.test>\nDATA\nsmuggled\n.\nafter\r\n"
    )
    path = tmp_path / "0123bare"
    path.write_bytes(body + b"METADATA")
    rcpt = Address("carl", "dest.test")
    entry = QueueEntry(
        "0123bare", Envelope(Address("alice", "example.test"), (rcpt,)), str(path), len(body)
    )
    mx = MXResolver(None, reactor(), smarthost=f"127.0.0.1:{postfix.port}")
    relay = RelayDelivery(mx, reactor(), helo="mx.example.test", tls="none")
    relay.startService()
    try:
        [result] = await relay.deliver(entry.job(), [rcpt])
    finally:
        await relay.stopService()
    assert result.state is RecipientState.DELIVERED, result.detail

    def mine():  # the domain's catch-all also holds the first test's message
        return [m for m in postfix.messages("carl@dest.test") if b"bare line ends" in m]

    await wait_until(mine, "Postfix to store it")
    await task.deferLater(reactor(), 0.5, lambda: None)  # a smuggled one would be there by now
    assert len(postfix.messages("carl@dest.test")) == 2
    [stored] = mine()
    assert b"\nbefore\n.\nMAIL FROM:<evil2@example.test>\n" in stored
    assert b"\nsmuggled\n.\nafter\n" in stored
    assert "evil2@example.test" not in postfix.log().replace("MAIL FROM:<evil2", "")


async def _verify_dkim(tmp_path, message: bytes, dns_port: int) -> None:
    """Perl's Mail::DKIM, an independent verifier, checks the delivered message
    against the key published in the loopback DNS server."""
    from twisted.internet import utils

    from tests.e2e.test_dkim_verify import VERIFY_PL

    perl = require_tool("perl")
    script, eml = tmp_path / "verify.pl", tmp_path / "delivered.eml"
    script.write_text(VERIFY_PL)
    eml.write_bytes(message)
    out, err, code = await utils.getProcessOutputAndValue(
        perl, [str(script), str(eml), str(dns_port)], reactor=reactor()
    )
    assert b"result=pass" in out, out + err


def _failed(log: str) -> str:
    """Recipients the relay reported as failed (from the JSON log)."""
    out = []
    for line in log.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "relay_attempt" and "550 5.1.1" in str(event.get("reply", "")):
            out.extend(event.get("recipients", []))
    return " ".join(out)
