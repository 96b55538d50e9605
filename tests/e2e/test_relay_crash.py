"""A message whose relay was never acknowledged survives kill -9 and is delivered
exactly once after the restart."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted

from tests.dnsserver import start_dns_server
from tests.e2e.test_relay_e2e import reactor, wait_until
from tests.peers import PeerConfig, start_peer

pytestmark = pytest.mark.e2e

MESSAGE = b"From: alice@example.test\r\nTo: bob@dest.test\r\nSubject: crash\r\n\r\nonce\r\n"


@pytest_twisted.ensureDeferred
async def test_unacknowledged_relay_survives_kill9_and_is_delivered_once(mta_server_factory):
    dns = start_dns_server(reactor())
    dns.zone("test").mx("dest.test", 10, "mx.dest.test").a("mx.dest.test", "127.0.0.1")
    hung = start_peer(reactor(), PeerConfig(final_reply=None))
    port = hung.port
    peers = [hung]
    try:
        mta = mta_server_factory(
            {
                "relay_networks": ["127.0.0.0/8"],
                "dns": {"nameservers": [dns.address], "timeout": 5.0},
                "relay": {"port": port, "data_timeout": 600.0},
                "queue": {"retry_schedule": [1.0]},
            }
        )
        with smtplib.SMTP("127.0.0.1", mta.smtp_port, timeout=30) as client:
            assert client.sendmail("alice@example.test", ["bob@dest.test"], MESSAGE) == {}
        # The peer has the whole message but never says 250.
        await wait_until(lambda: hung.messages, "the hung peer to receive the data")
        assert mta.kill9() == -9
        await hung.stop()
        peers.remove(hung)
        good = start_peer(reactor(), PeerConfig(), port=port)
        peers.append(good)
        mta.start()
        await wait_until(lambda: good.messages, "delivery after the restart")
        await wait_until(
            lambda: "bob@dest.test" not in mta.admin("queue", "list").stdout, "an empty queue"
        )
        assert len(good.messages) == 1
        assert b"Subject: crash" in good.messages[0].content
    finally:
        for p in peers:
            p.stop()
        await dns.stop()
