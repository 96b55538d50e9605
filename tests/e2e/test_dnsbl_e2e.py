"""`[checks] dnsbl` through `twistd mta`, resolving through the in-process test DNS
server: a listed client (connecting from 127.0.0.2) is refused at the greeting, an
unlisted one (127.0.0.1) is served.  Blocking client calls run in threads so the
reactor keeps answering DNS queries."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.dnsserver import start_dns_server
from tests.e2e.test_relay_e2e import reactor, wait_until

pytestmark = pytest.mark.e2e

MESSAGE = b"From: a@example.test\r\nTo: postmaster@localhost\r\nSubject: dnsbl\r\n\r\nhi\r\n"


def greeting_from(server, source: str):
    try:
        with smtplib.SMTP(timeout=10, source_address=(source, 0)) as smtp:
            code, text = smtp.connect(server.host, server.smtp_port)
            return code, text.decode()
    except smtplib.SMTPConnectError as e:
        return e.smtp_code, e.smtp_error.decode()


def send_from(server, source: str):
    with smtplib.SMTP(timeout=10, source_address=(source, 0)) as smtp:
        smtp.connect(server.host, server.smtp_port)
        return smtp.sendmail("a@example.test", ["postmaster@localhost"], MESSAGE)


@pytest_twisted.ensureDeferred
async def test_listed_client_is_refused_at_the_greeting(mta_server_factory):
    dns = start_dns_server(reactor())
    dns.zone("bl.test").a("2.0.0.127.bl.test", "127.0.0.2")
    try:
        server = await deferToThread(
            mta_server_factory,
            {
                "dns": {"nameservers": [dns.address], "timeout": 5.0},
                "checks": {"dnsbl": ["bl.test"], "dnsbl_action": "reject"},
            },
        )
        code, text = await deferToThread(greeting_from, server, "127.0.0.2")
        assert code == 554
        assert text == "5.7.1 Service unavailable; client [127.0.0.2] listed at bl.test"
        assert await deferToThread(send_from, server, "127.0.0.1") == {}
        new = server.maildir("postmaster@localhost") / "new"
        await wait_until(lambda: new.is_dir() and any(new.iterdir()), "the unlisted client's mail")
        assert "dnsbl_listed" in server.log()
    finally:
        await dns.stop()
