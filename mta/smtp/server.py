"""Listeners: the protocol factory, connection limits, and the listening services.

Connection limits are enforced before a session exists: an over-limit client gets
`421 4.7.0` from a tiny protocol that holds no session state, so a flood of
connections cannot make us allocate sessions.
"""

from __future__ import annotations

from collections import Counter

from twisted.application import internet
from twisted.internet import endpoints, protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mta.config import ListenerConfig
from mta.smtp import replies as R
from mta.smtp.session import SessionContext, SMTPSession

log = Logger()


class ConnectionTracker:
    """Counts open sessions in total and per client address, across listeners."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set = set()

    def admit(self, ip: str):
        """None when admitted, else the refusal reply."""
        if self.max_total and self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        return None

    def release(self, session) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.total -= 1
        ip = session.peer_ip
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class _Refusal(protocol.Protocol):
    def __init__(self, reply):
        self.reply = reply

    def connectionMade(self):
        self.transport.write(self.reply.to_bytes())
        self.transport.loseConnection()


class SMTPFactory(protocol.ServerFactory):
    """Builds a session per connection, or a refusal when over a limit."""

    noisy = False

    def __init__(self, context: SessionContext, tracker: ConnectionTracker):
        self.context = context
        self.tracker = tracker
        context.on_close = tracker.release

    def buildProtocol(self, addr):
        ip = getattr(addr, "host", str(addr))
        refusal = self.tracker.admit(ip)
        if refusal is not None:
            log.info("connection refused: {reason}", event="conn_refused", client=ip, reason=refusal.text)
            return _Refusal(refusal)
        session = SMTPSession(self.context, ip)
        session.factory = self
        self.tracker.sessions.add(session)
        return session


def listening_service(listener: ListenerConfig, factory: SMTPFactory, reactor, tls_context=None):
    """A `StreamServerEndpointService` for one `[[listener]]`."""
    host = listener.host
    if ":" in host:
        endpoint = endpoints.TCP6ServerEndpoint(reactor, listener.port, backlog=1024, interface=host)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, listener.port, backlog=1024, interface=host)
    wrapped = factory
    if listener.tls == "implicit":
        if tls_context is None:
            raise ValueError(f"listener {listener.name}: implicit TLS needs a certificate")
        wrapped = TLSMemoryBIOFactory(tls_context, False, factory)
    service = internet.StreamServerEndpointService(endpoint, wrapped)
    service.setName(f"listener-{listener.name}")
    service._raiseSynchronously = True
    return service
