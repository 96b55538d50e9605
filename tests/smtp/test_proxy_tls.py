"""PROXY headers over real loopback TCP in front of TLS: implicit TLS (port 465: the
header comes before the handshake) and STARTTLS, through `ListenerService` as the
composition root builds it, with smtplib as the client (in a thread, so the reactor
serves it)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import struct

import pytest_twisted
from twisted.internet import reactor, threads

from mta.config import ListenerConfig, build_config
from mta.policy.pipeline import PolicyPipeline
from mta.policy.relay import RelayCheck
from mta.smtp.server import ConnectionTracker, ListenerService, SMTPFactory
from mta.smtp.session import SessionContext
from mta.smtp.tls import server_context
from mta.testing import FakeDirectory, FakeSpool

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
MESSAGE = "From: bob@remote.example\r\nSubject: proxied\r\n\r\nhello\r\n"


def v2_inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + b"\x21\x11" + struct.pack("!H", len(packed)) + packed


class ProxiedSMTP(smtplib.SMTP):
    """smtplib, with a PROXY header written first on the new socket."""

    def __init__(self, header: bytes, *args, **kwargs):
        self.header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.sendall(self.header)
        return sock


class ProxiedSMTPS(smtplib.SMTP_SSL):
    """SMTP over implicit TLS, the PROXY header written in plain text before the
    handshake, as HAProxy does in TCP mode."""

    def __init__(self, header: bytes, *args, **kwargs):
        self.header = header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host, port, timeout):
        sock = socket.create_connection((host, port), timeout)
        sock.sendall(self.header)
        return self.context.wrap_socket(sock, server_hostname=host)


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's certificate is self-signed
    return context


def start_listener(tmp_path, tls: str, networks=("127.0.0.0/8",)):
    config = build_config(
        {
            "hostname": "mx.example.test",
            "local_domains": ["example.test"],
            "postmaster": "postmaster@example.test",
            "relay_networks": ["127.0.0.0/8"],
            "limits": {"proxy_networks": list(networks)},
        }
    )
    listener = ListenerConfig("smtps", "127.0.0.1", 0, tls, "none", proxy_protocol=True)
    directory = FakeDirectory(
        {"alice@example.test": ("alice@example.test",)}, postmaster="postmaster@example.test"
    )
    spool = FakeSpool()
    tls_context = server_context(None, None, str(tmp_path), config.hostname)
    context = SessionContext(
        config=config,
        listener=listener,
        spool=spool,
        pipeline=PolicyPipeline(
            [RelayCheck(config.local_domains, config.relay_networks, directory)], reactor
        ),
        clock=reactor,
        tls=tls_context,
    )
    service = ListenerService(
        listener,
        SMTPFactory(context, ConnectionTracker(100, 10)),
        reactor,
        tls_context,
        proxy_networks=config.limits.proxy_networks,
        proxy_timeout=config.limits.proxy_timeout,
    )
    service.startService()
    return service, service.port.getHost().port, spool


@pytest_twisted.inlineCallbacks
def test_implicit_tls_behind_a_proxy_header(tmp_path):
    service, port, spool = start_listener(tmp_path, "implicit")

    def send() -> None:
        header = v2_inet("203.0.113.7", "192.0.2.1", 51000, 465)
        with ProxiedSMTPS(header, "127.0.0.1", port, timeout=20, context=client_tls()) as client:
            client.sendmail("bob@remote.example", ["carol@elsewhere.example"], MESSAGE)

    try:
        failure = yield threads.deferToThread(_refused_or_sent, send)
        assert "Relay access denied" in failure  # 203.0.113.7 is not in relay_networks

        def deliver():
            header = v2_inet("203.0.113.7", "192.0.2.1", 51000, 465)
            with ProxiedSMTPS(
                header, "127.0.0.1", port, timeout=20, context=client_tls()
            ) as client:
                client.sendmail("bob@remote.example", ["alice@example.test"], MESSAGE)
                return client.sock.version()

        version = yield threads.deferToThread(deliver)
    finally:
        yield service.stopService()
    assert version in ("TLSv1.2", "TLSv1.3")
    [message] = spool.committed
    assert message.envelope.client_address == "203.0.113.7"
    received = message.trace_headers.decode()
    assert "([203.0.113.7])" in received and "with ESMTPS (TLSv1." in received


def _refused_or_sent(send) -> str:
    try:
        send()
    except smtplib.SMTPRecipientsRefused as e:
        return str(e)
    return "sent"


@pytest_twisted.inlineCallbacks
def test_starttls_behind_a_v1_header(tmp_path):
    service, port, spool = start_listener(tmp_path, "starttls")

    def send() -> None:
        header = b"PROXY TCP4 198.51.100.23 192.0.2.1 40000 25\r\n"
        with ProxiedSMTP(header, "127.0.0.1", port, timeout=20) as client:
            client.starttls(context=client_tls())
            client.sendmail("bob@remote.example", ["alice@example.test"], MESSAGE)

    try:
        yield threads.deferToThread(send)
    finally:
        yield service.stopService()
    [message] = spool.committed
    assert message.envelope.client_address == "198.51.100.23"
    assert "with ESMTPS (TLSv1." in message.trace_headers.decode()


@pytest_twisted.inlineCallbacks
def test_a_client_outside_proxy_networks_gets_no_greeting(tmp_path):
    service, port, spool = start_listener(tmp_path, "starttls", networks=("192.0.2.0/24",))

    def connect() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.50 192.0.2.1 40000 25\r\nEHLO x\r\n")
            data, chunk = b"", b"x"
            while chunk:
                chunk = sock.recv(4096)
                data += chunk
            return data

    try:
        data = yield threads.deferToThread(connect)
    finally:
        yield service.stopService()
    assert data == b""  # closed unread: 127.0.0.1 is not a trusted proxy here
    assert spool.committed == []


def test_a_connection_handed_to_another_worker_still_starts_with_its_header(tmp_path):
    """With several workers the balancer passes sockets on before reading them: the
    factory the receiving worker adopts them with must be the PROXY reader, outside
    implicit TLS."""
    from twisted.internet.testing import MemoryReactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from mta.process.balance import Balancer, BalancingFactory
    from mta.smtp.proxy import ProxyHeaderFactory

    balancer = Balancer(str(tmp_path), 2, 0, MemoryReactor())
    listener = ListenerConfig("smtps", "127.0.0.1", 0, "implicit", "none", proxy_protocol=True)
    tls_context = server_context(None, None, str(tmp_path), "mx.example.test")
    try:
        service = ListenerService(
            listener, object(), reactor, tls_context, balancer=balancer, shared=True
        )
        [registered] = balancer.factories
    finally:
        balancer.close()
    assert isinstance(service.factory, BalancingFactory)
    assert service.factory.wrapped is registered
    assert isinstance(registered, ProxyHeaderFactory)
    assert isinstance(registered.wrapped, TLSMemoryBIOFactory)
