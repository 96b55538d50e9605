"""`[checks] spf/dkim/dmarc = "enforce"` through `twistd mta`, resolving through the
in-process DNS server of tests/policy/authzone.py; smtplib is the client (in
threads, so the reactor keeps answering DNS).

The delivered message starts with our Authentication-Results (authserv-id
mx.example.test, the server's host name) and Received-SPF; a forged
Authentication-Results naming our host is gone (in memory and when spilled), one
from another host stays; DMARC p=reject is refused after DATA, p=quarantine is
quarantined, SPF fail without DMARC is refused at MAIL FROM, a DNS failure is 451."""

from __future__ import annotations

import smtplib

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.e2e.test_relay_e2e import wait_until
from tests.policy.authzone import auth_zones, message  # noqa: F401

pytestmark = pytest.mark.e2e

HOST = "mx.example.test"
FORGED = f"Authentication-Results: {HOST}; dmarc=pass header.from=fail.test\r\n".encode()
FOREIGN = b"Authentication-Results: mx.forwarder.test; spf=pass smtp.mailfrom=x.test\r\n"


def send(server, sender: str, data: bytes):
    """The SMTP exception smtplib raised, or None when the message was accepted."""
    try:
        with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as smtp:
            smtp.sendmail(sender, ["postmaster@localhost"], data)
    except smtplib.SMTPException as e:
        return e
    return None


def delivered(server) -> list[bytes]:
    """The delivered messages as the queue kept them (the store's Return-Path and
    Delivered-To taken off the top)."""
    new = server.maildir("postmaster@localhost") / "new"
    out = []
    for path in sorted(new.iterdir()) if new.is_dir() else ():
        data = path.read_bytes()
        while data.startswith((b"Return-Path:", b"Delivered-To:")):
            data = data.split(b"\r\n", 1)[1]
        out.append(data)
    return out


def config(zones, **checks):
    return {
        "dns": {"nameservers": [zones.address], "timeout": 5.0},
        "checks": {"spf": "enforce", "dkim": "enforce", "dmarc": "enforce", **checks},
    }


@pytest_twisted.ensureDeferred
async def test_sender_authentication_end_to_end(mta_server_factory, auth_zones):  # noqa: F811
    server = await deferToThread(mta_server_factory, config(auth_zones))
    signed = auth_zones.keys["ed"].sign(message(extra=FORGED + FOREIGN))
    big = auth_zones.keys["rsa"].sign(
        message(subject="big", extra=FORGED)[:-2]
        + b"x" * 76
        + b"\r\n" * 1
        + b"y" * 300000
        + b"\r\n"
    )
    assert await deferToThread(send, server, "alice@example.test", signed) is None
    assert await deferToThread(send, server, "alice@example.test", big) is None
    await wait_until(lambda: len(delivered(server)) == 2, "two delivered messages")
    for data in delivered(server):
        assert data.startswith(f"Authentication-Results: {HOST};\r\n\tspf=pass".encode()), data[
            :300
        ]
        head = data.split(b"\r\n\r\n", 1)[0]
        unfolded = head.replace(b"\r\n\t", b" ")
        assert b"dkim=pass header.d=example.test" in unfolded
        assert b"dmarc=pass (p=reject dis=NONE) header.from=example.test" in unfolded
        assert b"\r\nReceived-SPF: Pass " in head
        assert head.count(b"Authentication-Results:") == (2 if b"Subject: hello" in head else 1)
        assert FORGED not in data
    assert any(FOREIGN in d for d in delivered(server))

    # p=reject, no aligned pass: 550 5.7.1 after DATA
    refused = await deferToThread(send, server, "alice@fail.test", message("a@fail.test"))
    assert isinstance(refused, smtplib.SMTPDataError), refused
    assert refused.smtp_code == 550 and refused.smtp_error.startswith(b"5.7.1 ")
    # p=quarantine: accepted, held in <datadir>/quarantine/
    quarantined = await deferToThread(send, server, "alice@soft.test", message("a@soft.test"))
    assert quarantined is None
    quarantine = server.datadir / "quarantine"
    await wait_until(
        lambda: quarantine.is_dir() and any(quarantine.glob("*.json")), "a quarantined message"
    )
    # the SPF record's include answers SERVFAIL: 451 at MAIL FROM (fail = closed)
    temp = await deferToThread(send, server, "alice@temp.test", message("a@temp.test"))
    assert isinstance(temp, smtplib.SMTPSenderRefused), temp
    assert temp.smtp_code == 451 and temp.smtp_error.startswith(b"4.7.24 ")
    log = server.log()
    assert '"check":"dmarc","result":"fail"' in log


@pytest_twisted.ensureDeferred
async def test_spf_fail_without_dmarc_is_refused_at_mail(mta_server_factory, auth_zones):  # noqa: F811
    server = await deferToThread(
        mta_server_factory, config(auth_zones, dmarc="off", dkim="off", fail="open")
    )
    refused = await deferToThread(send, server, "alice@fail.test", message("a@fail.test"))
    assert isinstance(refused, smtplib.SMTPSenderRefused), refused
    assert refused.smtp_code == 550 and refused.smtp_error.startswith(b"5.7.23 ")
    # DNS failure with fail = open: accepted with spf=temperror
    assert await deferToThread(send, server, "alice@temp.test", message("a@temp.test")) is None
    await wait_until(lambda: len(delivered(server)) == 1, "the accepted message")
    (data,) = delivered(server)
    assert data.startswith(f"Authentication-Results: {HOST};\r\n\tspf=temperror".encode())
