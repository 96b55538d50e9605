"""The outbound relay: the IDeliveryAgent for recipients outside `local_domains`.

`RelayDelivery.deliver(job, recipients)` groups the recipients by domain and, for
each domain at once, resolves the targets (`MXResolver`) and tries them in order
until one carries the transaction, Postfix-like:

- the next target is tried after a connection failure, a session failure (greeting,
  EHLO, TLS, timeout, lost connection before the end-of-data reply) or a 4xx reply
  to MAIL FROM; an address that refused the connection is remembered as unreachable;
- replies to RCPT and to the end of data are final for this attempt: 2xx delivered,
  4xx deferred, 5xx failed (the runner bounces; part B);
- a permanent DNS answer (NXDOMAIN, null MX) fails the domain's recipients, every
  other DNS problem and "all targets failed" defers them.

The sender's DSN request (RFC 3461) travels with the message to a server that
offers DSN; each result is a `DeliveryResult` whose `dsn_passed` tells the queue
runner whether that server now owns success notices (True) or whether it must
report a requested success itself as "relayed" (False; RFC 3461 5.2.3).  A result
decided by a server's reply names that server (`remote_mta`) and its detail reads
``mx.example[192.0.2.1]:25 said: 550 5.1.1 ...``; a result we decided ourselves
(DNS, connection, timeout, SIZE, SMTPUTF8) has no `remote_mta` and its detail is
just our reply, so a DSN never presents our words as the peer's (RFC 3464 2.3.6).

What is sent depends on the peer (`_Content`, prepared at most once per variant
and attempt): a message received with SMTPUTF8 whose header fields hold raw UTF-8
goes to a server without SMTPUTF8 downgraded (`mta.delivery.downgrade`: only the
header section is rewritten, the body streams unchanged, SIZE counts the downgraded
message), or fails 554 5.6.7 when it cannot be downgraded (a non-ASCII address in a
header field).  The DKIM signature is computed over exactly the bytes sent, so a
downgraded message is signed after the downgrade.  `BODY=8BITMIME` is declared when
the envelope says 8BITMIME or, for a server offering 8BITMIME, when a scan of the
message finds 8-bit bytes (clients often send 8-bit content without declaring it).

At most `destination_concurrency` transactions run per domain at once.  After a
transaction the connection goes into a small idle pool for its (address, port) and is
reused (after RSET) by the next message for that target, or closed with QUIT after
`idle_timeout` seconds.  One log event per attempt: qid, recipients, target, reply.
"""

from __future__ import annotations

from collections import defaultdict

import attrs
from twisted.application.service import Service
from twisted.internet import defer, endpoints, ssl
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mta.delivery.downgrade import DowngradeError, downgrade_body
from mta.delivery.mx import MXResolver, RouteError, Target
from mta.delivery.smtpclient import (
    CHUNK,
    BodyReader,
    Message,
    SessionError,
    SMTPClientProtocol,
    Timeouts,
)
from mta.envelope import Address, BodyType, DeliveryResult, RecipientState, Reply
from mta.interfaces import IDeliveryAgent
from mta.observe.logging import Logger

log = Logger()

MAX_IDLE_PER_TARGET = 4
DEFAULT_TIMEOUTS = Timeouts()
MAX_TRANSACTIONS_PER_CONNECTION = 100


def client_tls_context():
    """Opportunistic client TLS: TLS 1.2 minimum, certificate not verified."""
    return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)


def result_for(
    recipient: Address,
    reply: Reply,
    target: Target | None,
    dsn_passed: bool | None = False,
    state: RecipientState | None = None,
) -> DeliveryResult:
    """The result `reply` means for `recipient`: said by the server at `target`,
    or decided by us when `target` is None."""
    if state is None:
        if reply.is_success:
            state = RecipientState.DELIVERED
        elif reply.is_transient:
            state = RecipientState.DEFERRED
        else:
            state = RecipientState.FAILED
    if target is None:
        return DeliveryResult(recipient, state, str(reply), reply, dsn_passed)
    detail = f"{target} said: {reply}"
    return DeliveryResult(recipient, state, detail, reply, dsn_passed, target.remote_mta)


def is_eight_bit(body) -> bool:
    """Blocking: whether the message `body` (an `IMessageBody`) has a byte above 127."""
    chunks = body.chunks(CHUNK)
    try:
        return any(not chunk.isascii() for chunk in chunks)
    finally:
        chunks.close()


@attrs.frozen
class Prepared:
    """What goes to one peer: `body` (the queued message or its downgrade) after
    the DKIM `signature`, how to declare it, and whether it needs SMTPUTF8."""

    body: object  # IMessageBody
    signature: bytes
    body_type: BodyType
    utf8_headers: bool
    downgraded: bool = False

    @property
    def size(self) -> int:
        return len(self.signature) + self.body.size


class _Content:
    """The variants of one job's message for the peers of one attempt, each
    prepared (downgrade, scan, signature: blocking work on the pool) at most once."""

    def __init__(self, relay: RelayDelivery, job):
        self._relay = relay
        self._job = job
        self._downgrade: tuple | None = None  # (DowngradedBody | None, DowngradeError | None)
        self._signatures: dict[bool, bytes] = {}
        self._eight_bit: dict[bool, bool] = {}

    async def for_peer(self, extensions: dict) -> Prepared:
        """The message for a server offering `extensions`; DowngradeError when it
        needs SMTPUTF8, the server lacks it and the headers cannot be downgraded;
        OSError when the queued message cannot be read."""
        envelope = self._job.envelope
        body = self._job.body
        downgraded = utf8_headers = False
        addresses = (envelope.sender, *envelope.recipients)
        if (
            envelope.smtputf8
            and "SMTPUTF8" not in extensions
            and not any(a.is_utf8 for a in addresses)
        ):
            if self._downgrade is None:
                try:
                    self._downgrade = (await self._relay._blocking(downgrade_body, body), None)
                except DowngradeError as e:
                    self._downgrade = (None, e)
            result, error = self._downgrade
            if error is not None:
                raise error
            if result is not None:
                body, downgraded = result, True
        elif envelope.smtputf8:
            # The header fields may hold UTF-8 (not read here): a server offering
            # SMTPUTF8 takes them; one without it is refused for the UTF-8 addresses.
            utf8_headers = True
        body_type = envelope.body
        if body_type is BodyType.SEVEN_BIT and "8BITMIME" in extensions:
            if downgraded not in self._eight_bit:
                self._eight_bit[downgraded] = await self._relay._blocking(is_eight_bit, body)
            if self._eight_bit[downgraded]:
                body_type = BodyType.EIGHT_BIT
        if downgraded not in self._signatures:
            self._signatures[downgraded] = await self._sign(body)
        return Prepared(body, self._signatures[downgraded], body_type, utf8_headers, downgraded)

    async def _sign(self, body) -> bytes:
        signer = self._relay.signer
        if signer is None:
            return b""
        job = self._job if body is self._job.body else attrs.evolve(self._job, body=body)
        try:
            return await signer.sign_job(job)
        except Exception:
            log.failure("{qid}: DKIM signing failed; sending unsigned", qid=job.qid)
            return b""


def dsn_request(envelope, rcpts) -> dict:
    """The Message fields carrying `envelope`'s DSN request for `rcpts`."""
    fields: dict = {"dsn_ret": envelope.dsn_ret, "dsn_envid": envelope.dsn_envid}
    n = len(envelope.recipients)
    for name in ("dsn_notify", "dsn_orcpt"):
        values = getattr(envelope, name)
        if len(values) == n:
            fields[name] = tuple(values[envelope.recipients.index(r)] for r in rcpts)
    return fields


@implementer(IDeliveryAgent)
class RelayDelivery(Service):
    """Relays to the world.  A Service only so that stopping it closes idle connections.

    `connect(target) -> Deferred[SMTPClientProtocol]` may be injected (tests); by
    default a TCP connection is made with `reactor` within `connect_timeout`.
    """

    name = "relay"

    def __init__(
        self,
        mx: MXResolver,
        reactor,
        *,
        helo: str,
        tls: str = "opportunistic",
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        connect_timeout: float = 30.0,
        destination_concurrency: int = 20,
        idle_timeout: float = 5.0,
        pool=None,
        tls_context=None,
        connect=None,
        signer=None,
    ):
        self.mx = mx
        self.signer = signer  # mta.delivery.dkim.DKIMSigner: signs just before sending
        self.reactor = reactor
        self.helo = helo
        self.tls = tls
        self.timeouts = timeouts
        self.connect_timeout = connect_timeout
        self.destination_concurrency = max(1, destination_concurrency)
        self.idle_timeout = idle_timeout
        self._pool = pool
        self._tls_context = (
            tls_context
            if tls_context is not None
            else (client_tls_context() if tls != "none" else None)
        )
        self._connect = connect or self._tcp_connect
        self._limits: dict[str, defer.DeferredSemaphore] = {}
        self._idle: dict[tuple[str, int], list[tuple[SMTPClientProtocol, object]]] = defaultdict(
            list
        )

    # -- IDeliveryAgent ------------------------------------------------------------

    def deliver(self, job, recipients) -> defer.Deferred:
        by_domain: dict[str, list[Address]] = defaultdict(list)
        for rcpt in recipients:
            by_domain[rcpt.domain.lower()].append(rcpt)
        calls = [
            defer.Deferred.fromCoroutine(self._deliver_domain(job, domain, rcpts))
            for domain, rcpts in by_domain.items()
        ]
        d = defer.gatherResults(calls, consumeErrors=True)
        d.addCallback(lambda lists: [r for results in lists for r in results])
        return d

    async def _deliver_domain(self, job, domain: str, rcpts: list[Address]):
        limit = self._limits.get(domain)
        if limit is None:
            limit = self._limits[domain] = defer.DeferredSemaphore(self.destination_concurrency)
        await limit.acquire()
        try:
            return await self._attempt(job, domain, rcpts)
        finally:
            limit.release()
            if not limit.waiting and limit.tokens == limit.limit:
                self._limits.pop(domain, None)

    async def _attempt(self, job, domain: str, rcpts: list[Address]) -> list[DeliveryResult]:
        try:
            targets = await self.mx.resolve(domain)
        except RouteError as e:
            self._log(job, rcpts, domain, e.reply)
            state = RecipientState.FAILED if e.permanent else RecipientState.DEFERRED
            return [DeliveryResult(r, state, str(e.reply), e.reply) for r in rcpts]
        last = Reply(451, "4.4.1", f"no mail exchanger of {domain} could be reached")
        last_peer: Target | None = None  # who said `last`, when a server did
        content = _Content(self, job)
        for target in targets:
            if self.mx.is_unreachable(target):
                continue
            try:
                proto = await self._session(target)
            except SessionError as e:
                last, last_peer = e.reply, target if e.remote else None
                self._log(job, rcpts, str(target), e.reply)
                continue
            try:
                prepared = await content.for_peer(proto.extensions)
            except DowngradeError as e:
                self._release(target, proto)
                reply = Reply(
                    554,
                    "5.6.7",
                    f"SMTPUTF8 is required, but was not offered by {target.peer}, and the"
                    f" message cannot be downgraded: {e}",
                )
                self._log(job, rcpts, str(target), reply)
                return [result_for(r, reply, None) for r in rcpts]
            except OSError as e:
                self._release(target, proto)
                reply = Reply(451, "4.3.0", f"cannot read the queued message: {e}")
                self._log(job, rcpts, str(target), reply)
                return [result_for(r, reply, None) for r in rcpts]
            envelope = job.envelope
            message = Message(
                sender=envelope.sender,
                recipients=tuple(rcpts),
                size=prepared.size,
                body_source=BodyReader(prepared.signature, prepared.body, self.reactor, self._pool),
                body=prepared.body_type,
                smtputf8=envelope.smtputf8,
                utf8_headers=prepared.utf8_headers,
                **dsn_request(envelope, rcpts),
            )
            try:
                outcome = await proto.send(message)
            except SessionError as e:
                last, last_peer = e.reply, target if e.remote else None
                self._log(job, rcpts, str(target), e.reply)
                proto.abort()
                continue
            seen = [outcome.mail, outcome.data, *outcome.replies.values()]
            if any(r is not None and r.code == 421 for r in seen):
                proto.abort()  # 421: the server is closing the channel
            else:
                self._release(target, proto)
            if outcome.mail is not None and outcome.mail.is_transient:
                last, last_peer = outcome.mail, target
                self._log(job, rcpts, str(target), outcome.mail)
                continue  # 4xx to MAIL FROM: the next MX may take it
            passed = "DSN" in proto.extensions
            said_by = None if outcome.local else target
            results = [result_for(r, outcome.replies[r], said_by, passed) for r in rcpts]
            replies = "; ".join(dict.fromkeys(str(outcome.replies[r]) for r in rcpts))
            self._log(job, rcpts, str(target), replies, results, proto)
            return results
        if last_peer is not None:
            return [result_for(r, last, last_peer, None, RecipientState.DEFERRED) for r in rcpts]
        return [
            DeliveryResult(r, RecipientState.DEFERRED, f"{domain}: {last}", last) for r in rcpts
        ]

    async def _blocking(self, f, *args):
        """`f(*args)` on the pool (directly when there is none)."""
        if self._pool is None:
            return f(*args)
        return await deferToThreadPool(self.reactor, self._pool, f, *args)

    # -- connections -----------------------------------------------------------------

    async def _session(self, target: Target) -> SMTPClientProtocol:
        """An established session to `target`: an idle one (after RSET) or a new one."""
        idle = self._idle.get(target.key)
        while idle:
            proto, timer = idle.pop()
            if timer.active():
                timer.cancel()
            if proto.closed:
                continue
            try:
                await proto.reset()
                return proto
            except SessionError:
                proto.abort()
        try:
            proto = await self._connect(target)
        except Exception as e:
            self.mx.mark_unreachable(target)
            raise SessionError(
                Reply(451, "4.4.1", f"connect to {target} failed: {e.__class__.__name__}"),
                "connect",
            ) from None
        try:
            await proto.establish(self.helo, self.tls, self._tls_context)
        except SessionError:
            proto.abort()
            raise
        self.mx.mark_reachable(target)
        return proto

    def _tcp_connect(self, target: Target) -> defer.Deferred:
        cls = (
            endpoints.TCP6ClientEndpoint if ":" in target.address else endpoints.TCP4ClientEndpoint
        )
        endpoint = cls(self.reactor, target.address, target.port, timeout=self.connect_timeout)
        proto = SMTPClientProtocol(self.reactor, self.timeouts, peer=target.peer)
        return endpoints.connectProtocol(endpoint, proto)

    def _release(self, target: Target, proto: SMTPClientProtocol) -> None:
        idle = self._idle[target.key]
        if (
            proto.closed
            or not self.running
            or proto.transactions >= MAX_TRANSACTIONS_PER_CONNECTION
            or len(idle) >= MAX_IDLE_PER_TARGET
        ):
            defer.ensureDeferred(proto.quit())
            return
        timer = self.reactor.callLater(self.idle_timeout, self._expire, target.key, proto)
        idle.append((proto, timer))

    def _expire(self, key, proto) -> None:
        idle = self._idle.get(key, [])
        idle[:] = [(p, t) for p, t in idle if p is not proto]
        if not idle:
            self._idle.pop(key, None)
        defer.ensureDeferred(proto.quit())

    def stopService(self):
        super().stopService()
        quits = []
        for idle in self._idle.values():
            for proto, timer in idle:
                if timer.active():
                    timer.cancel()
                quits.append(defer.ensureDeferred(proto.quit()))
        self._idle.clear()
        return defer.DeferredList(quits)

    def idle_connections(self) -> int:
        return sum(len(v) for v in self._idle.values())

    # -- logging ---------------------------------------------------------------------

    def _log(self, job, rcpts, target: str, reply, results=None, proto=None) -> None:
        log.info(
            "relay {qid} to {recipients} via {mx}: {reply}",
            qid=job.qid,
            recipients=[str(r) for r in rcpts],
            mx=target,
            reply=str(reply) if reply is not None else "",
            delivered=[
                str(r.recipient) for r in results or () if r.state is RecipientState.DELIVERED
            ],
            tls=(proto.tls_info or "yes") if proto is not None and proto.tls else "no",
            event="relay_attempt",
        )
