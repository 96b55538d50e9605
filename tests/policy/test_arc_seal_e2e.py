"""`[checks] arc_seal = true` through `twistd mta`: a message from outside reaches an
alias that points to a remote address; the copy the next hop (an in-process SMTP peer,
our smarthost) receives carries our ARC set, made with the `[dkim]` key of our
host name's domain (published in the in-process DNS server), and its chain verifies;
the original DKIM signature still passes."""

from __future__ import annotations

import re
import smtplib

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from mta.policy.arc import verify_chain
from mta.policy.dkimverify import verify_signatures
from tests.e2e.test_relay_e2e import reactor, wait_until
from tests.peers import start_peer
from tests.policy.authzone import auth_zones, in_thread, message  # noqa: F401

pytestmark = pytest.mark.e2e


def send(server, sender: str, rcpt: str, data: bytes) -> None:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as smtp:
        smtp.sendmail(sender, [rcpt], data)


@pytest_twisted.ensureDeferred
async def test_forwarded_mail_is_sealed(mta_server_factory, auth_zones):  # noqa: F811
    peer = start_peer(reactor())
    server = None
    try:
        server = mta_server_factory(
            {
                "dns": {"nameservers": [auth_zones.address], "timeout": 5.0},
                "relay": {"smarthost": f"127.0.0.1:{peer.port}", "tls": "none"},
                "dkim": {"selector": "fwd", "domains": ["example.test"]},
                "checks": {"spf": "tag", "dkim": "tag", "dmarc": "tag", "arc_seal": True},
            },
            start=False,
        )
        keygen = server.admin("dkim", "keygen", "example.test", "--selector", "fwd")
        assert keygen.returncode == 0, keygen.stderr
        value = "".join(re.findall(r'"([^"]*)"', keygen.stdout))
        auth_zones.zones["example.test"].txt(
            "fwd._domainkey.example.test", *[value[i : i + 250] for i in range(0, len(value), 250)]
        )
        added = server.admin("alias", "add", "fwd@example.test", "carol@dest.test")
        assert added.returncode == 0, added.stderr
        await deferToThread(server.start)

        signed = auth_zones.keys["other"].sign(message("Alice <a@other-org.test>"))
        await deferToThread(send, server, "alice@other-org.test", "fwd@example.test", signed)
        await wait_until(lambda: peer.messages, "the forwarded copy at the next hop")
    finally:
        if server is not None:
            # While the reactor runs, so the peer answers the relay's QUIT.
            await deferToThread(server.stop)
        await peer.stop()
    (copy,) = peer.messages
    assert copy.recipients == ["carol@dest.test"]
    data = copy.content
    assert data.startswith(b"ARC-Seal: i=1;"), data[:200]
    head = data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
    assert b"d=example.test" in head and b"ARC-Authentication-Results: i=1; mx.example.test" in head
    chain = await in_thread(verify_chain, data, auth_zones.dns())
    assert (chain.result, chain.instances, chain.sealer) == ("pass", 1, "example.test")
    (sig,) = await in_thread(verify_signatures, data, auth_zones.dns())
    assert (sig.result, sig.domain) == ("pass", "other-org.test")
