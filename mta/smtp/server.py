"""Listeners: the protocol factory, connection limits, and the listening services.

Connection limits are enforced before a session exists: an over-limit client gets
`421 4.7.0` from a tiny protocol that holds no session state, so a flood of
connections cannot make us allocate sessions.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import Counter

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.error import CannotListenError
from twisted.protocols.tls import TLSMemoryBIOFactory

from mta.config import ListenerConfig
from mta.observe.logging import Logger
from mta.process.balance import BalancingFactory
from mta.smtp import replies as R
from mta.smtp.proxy import ProxyHeaderFactory
from mta.smtp.session import SessionContext, SMTPSession

log = Logger()

BIND_RETRY_SECONDS = 5.0


class ConnectionTracker:
    """Counts open sessions in total and per client address, across listeners."""

    def __init__(self, max_total: int, max_per_ip: int):
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set = set()
        self.on_change = None  # callable(total): publishes this process's load

    def admit(self, ip: str):
        """None when admitted, else the refusal reply."""
        if self.max_total and self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.max_per_ip and self.per_ip[ip] >= self.max_per_ip:
            return R.TOO_MANY_FROM_IP
        self.total += 1
        self.per_ip[ip] += 1
        if self.on_change is not None:
            self.on_change(self.total)
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
        if self.on_change is not None:
            self.on_change(self.total)


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
            log.info(
                "connection refused: {reason}", event="conn_refused", client=ip, reason=refusal.text
            )
            return _Refusal(refusal)
        session = SMTPSession(self.context, ip)
        session.factory = self
        self.tracker.sessions.add(session)
        return session


class ListenerService(service.Service):
    """Listens for one `[[listener]]`.

    With several worker processes (`shared`), every process binds its own socket with
    SO_REUSEPORT and the kernel spreads connections evenly across them.  A worker that
    may not bind (a privileged port after the parent dropped root) adopts the
    listening socket it inherited from the parent instead.  A single process binds
    without SO_REUSEPORT, so a second server on the same port fails loudly.

    A `proxy_protocol` listener reads the PROXY header first, before any TLS
    handshake, and only from `proxy_networks` (mta.smtp.proxy); a connection handed
    over between workers has not been read from, so its header travels with it.
    """

    def __init__(
        self,
        listener: ListenerConfig,
        factory,
        reactor,
        tls_context=None,
        inherited_fd: int | None = None,
        shared: bool = False,
        balancer=None,
        proxy_networks: tuple = (),
        proxy_timeout: float = 10.0,
    ):
        self.listener = listener
        self.setName(f"listener-{listener.name}")
        self._reactor = reactor
        self._inherited_fd = inherited_fd
        self._shared = shared or inherited_fd is not None
        self.port = None
        if listener.tls == "implicit":
            if tls_context is None:
                raise ValueError(f"listener {listener.name}: implicit TLS needs a certificate")
            factory = TLSMemoryBIOFactory(tls_context, False, factory)
        if listener.proxy_protocol:
            factory = ProxyHeaderFactory(
                factory, proxy_networks, reactor, timeout=proxy_timeout, listener=listener.name
            )
        if balancer is not None:
            index = balancer.register(factory, self._family())
            factory = BalancingFactory(factory, balancer, index)
        self.factory = factory

    def privilegedStartService(self):
        # Bound before twistd switches to an unprivileged user (ports below 1024).
        if self.port is None:
            self.port = self._bind()
        service.Service.privilegedStartService(self)

    def startService(self):
        if self.port is None:
            self.port = self._bind()
        service.Service.startService(self)

    def _bind(self):
        listener = self.listener
        if not self._shared:
            return self._retry_in_use(
                lambda: self._reactor.listenTCP(
                    listener.port, self.factory, backlog=1024, interface=listener.host
                )
            )
        try:
            port = self._retry_in_use(self._reuseport)
        except (OSError, CannotListenError) as e:
            if self._inherited_fd is None:
                raise
            log.info(
                "listener {name}: SO_REUSEPORT bind refused ({error}); sharing the parent's socket",
                name=listener.name,
                error=str(e),
            )
            port = self._reactor.adoptStreamPort(self._inherited_fd, self._family(), self.factory)
        if self._inherited_fd is not None:
            os.close(self._inherited_fd)
            self._inherited_fd = None
        return port

    def _family(self) -> int:
        return socket.AF_INET6 if ":" in self.listener.host else socket.AF_INET

    def _reuseport(self):
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((self.listener.host, self.listener.port))
            except OSError as e:
                raise CannotListenError(self.listener.host, self.listener.port, e) from None
            sock.listen(1024)
            sock.setblocking(False)
            return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)
        finally:
            sock.close()  # adoptStreamPort holds its own duplicate

    @staticmethod
    def _retry_in_use(bind):
        # A restart right after a crash can find the port still held for a moment by
        # worker processes that are shutting down: retry briefly before giving up.
        deadline = time.monotonic() + BIND_RETRY_SECONDS
        while True:
            try:
                return bind()
            except CannotListenError as e:
                in_use = (
                    isinstance(e.socketError, OSError) and e.socketError.errno == errno.EADDRINUSE
                )
                if not in_use or time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def stopService(self):
        service.Service.stopService(self)
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None

    def fileno(self) -> int:
        return self.port.fileno()
