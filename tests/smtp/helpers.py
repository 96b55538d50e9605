"""Building sessions on StringTransport + Clock for protocol tests."""

from __future__ import annotations

import attrs
from twisted.internet import task
from twisted.internet.testing import StringTransport

from mta.config import ListenerConfig, build_config
from mta.policy.pipeline import PolicyPipeline
from mta.policy.ratelimit import RateLimitCheck
from mta.policy.relay import RelayCheck
from mta.policy.sender import SenderCheck
from mta.smtp.server import ConnectionTracker, SMTPFactory
from mta.smtp.session import SessionContext
from mta.testing import FakeDirectory, FakeSpool


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing a handshake, what was
    written before it, and how many writes there were."""

    tls_started_with = None
    written_before_tls = None
    write_calls = 0

    def write(self, data):
        self.write_calls += 1
        super().write(data)

    def startTLS(self, ctx, normal=True):
        self.tls_started_with = ctx
        self.written_before_tls = self.value()


@attrs.define
class Harness:
    session: object
    transport: TLSStringTransport
    spool: FakeSpool
    directory: FakeDirectory
    clock: task.Clock
    factory: SMTPFactory

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.session.dataReceived(data)

    def replies(self) -> list[str]:
        """Every complete reply line written since the last call."""
        out = self.transport.value().decode("utf-8")
        self.transport.clear()
        return [line for line in out.split("\r\n") if line]

    def codes(self) -> list[str]:
        return [line[:3] for line in self.replies() if line[3:4] == " "]

    def ehlo(self) -> None:
        self.send("EHLO client.example\r\n")
        self.replies()


def make_harness(
    *,
    config: dict | None = None,
    listener: ListenerConfig | None = None,
    spool: FakeSpool | None = None,
    directory: FakeDirectory | None = None,
    peer: str = "192.0.2.10",
    tls: object | None = None,
    tracker: ConnectionTracker | None = None,
    checks: tuple = (),
    pipeline_options: dict | None = None,
    sender_policy=None,
    ip_limiter=None,
    user_limiter=None,
    **context_fields,
) -> Harness:
    """A session on a StringTransport.  Its pipeline is what the composition root
    builds (rate limits, sender rule and relay rule, for those given) followed by
    `checks`."""
    data = {
        "hostname": "mx.example.test",
        "local_domains": ["example.test", "localhost"],
        "postmaster": "postmaster@example.test",
    }
    data.update(config or {})
    cfg = build_config(data)
    listener = listener or ListenerConfig("smtp", "127.0.0.1", 2525, "starttls", "optional")
    clock = context_fields.pop("clock", None) or task.Clock()
    clock.advance(1_800_000_000 - clock.seconds())
    spool = spool or FakeSpool()
    directory = directory or FakeDirectory(
        {
            "alice@example.test": ("alice@example.test",),
            "team@example.test": ("alice@example.test", "bob@example.test"),
        },
        postmaster="postmaster@example.test",
    )
    builtin = []
    if ip_limiter is not None:
        builtin.append(RateLimitCheck(ip_limiter, "ip"))
    if user_limiter is not None:
        builtin.append(RateLimitCheck(user_limiter, "user"))
    if sender_policy is not None:
        builtin.append(SenderCheck(sender_policy))
    builtin.append(RelayCheck(cfg.local_domains, cfg.relay_networks, directory))
    pipeline = PolicyPipeline([*builtin, *checks], clock, **(pipeline_options or {}))
    ctx = SessionContext(
        config=cfg,
        listener=listener,
        spool=spool,
        pipeline=pipeline,
        clock=clock,
        tls=tls,
        **context_fields,
    )
    tracker = tracker or ConnectionTracker(
        cfg.limits.max_connections, cfg.limits.max_connections_per_ip
    )
    factory = SMTPFactory(ctx, tracker)
    from twisted.internet.address import IPv4Address

    session = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    session.makeConnection(transport)
    return Harness(session, transport, spool, directory, clock, factory)
