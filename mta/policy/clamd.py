"""ClamAV as an end-of-message check: our own zINSTREAM client and `VirusCheck`.

`ClamdClient.scan(body)` opens one connection to clamd (TCP or a unix socket), sends
`zINSTREAM\\0`, then the message as 4-byte big-endian length-prefixed chunks read
from the `IMessageBody` one at a time on a thread (the next chunk is read only when
the previous one was handed to the transport and the transport is not pushing back,
so memory holds about one chunk), then a zero-length chunk; clamd answers
`stream: OK`, `stream: <name> FOUND` or `<text> ERROR`, NUL-terminated.  A message
over clamd's StreamMaxLength is passed unscanned, tagged `X-Virus-Status: Unscanned`
and logged as a warning (like clamav-milter): set StreamMaxLength to at least
`[limits] max_message_size` to scan everything.

`VirusCheck` (the `clamd` check, `Phase.DATA`) scans every message, authenticated
submissions included.  An infected message is refused with `554 5.7.0`
(`virus_action = "reject"`) or quarantined (`"quarantine"`); it is never delivered
to a mailbox.  A clamd that is down, slow or answers ERROR makes the check fail, and
the composition root makes this check fail closed (451), whatever `[checks] fail`.
"""

from __future__ import annotations

import struct

import attrs
from twisted.internet import defer, threads
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.daemons import DaemonError, ReplyCollector, connect
from mta.policy.verdict import Phase, PolicyContext, Verdict

log = Logger()

CHUNK_SIZE = 65536
ACTIONS = ("reject", "quarantine")


def virus_reply(name: str) -> Reply:
    return Reply(554, "5.7.0", f"Message rejected: virus found: {name}")


@attrs.frozen
class ScanResult:
    """clamd's answer: `virus` is the signature name, None for a clean message;
    `skipped` says why clamd did not scan it all (over its StreamMaxLength)."""

    virus: str | None
    skipped: str | None = None


def parse_reply(data: bytes) -> ScanResult:
    """A `ScanResult` from clamd's answer to zINSTREAM; DaemonError for ERROR or junk."""
    text = data.rstrip(b"\0\r\n").decode("utf-8", "replace")
    if text.endswith(" FOUND"):
        _, _, rest = text.partition(": ")
        return ScanResult(rest[: -len(" FOUND")].strip() or "unknown")
    if text.endswith(": OK") or text == "OK":
        return ScanResult(None)
    if "size limit exceeded" in text:
        return ScanResult(None, "over clamd's StreamMaxLength")
    raise DaemonError(f"clamd: {text[:200] or 'no answer'}")


@implementer(IPushProducer)
class _Stream(ReplyCollector):
    """The connection: collects clamd's NUL-terminated answer, and follows the
    transport's pause/resume so chunks are read no faster than they are sent."""

    def __init__(self):
        super().__init__(limit=64 * 1024, complete=lambda data: data.endswith(b"\0"))
        self._resumed: defer.Deferred | None = None
        self._paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiting, self._resumed = self._resumed, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    async def writable(self) -> None:
        if self._paused:
            self._resumed = defer.Deferred()
            await self._resumed

    def connectionLost(self, reason=None) -> None:
        self.resumeProducing()
        super().connectionLost(reason)


class ClamdClient:
    """Talks to one clamd through a client `endpoint`; reads bodies on `pool` (the
    composition root's bounded pool for check work; `reactor`'s own when None)."""

    def __init__(self, endpoint, reactor, chunk_size: int = CHUNK_SIZE, pool=None):
        self._endpoint = endpoint
        self._reactor = reactor
        self._chunk_size = chunk_size
        self._pool = pool

    def scan(self, body) -> defer.Deferred:
        """Deferred `ScanResult` for `body` (an `IMessageBody`); cancellable."""
        return defer.Deferred.fromCoroutine(self._scan(body))

    async def _scan(self, body) -> ScanResult:
        stream = _Stream()
        await connect(self._endpoint, stream)
        pool = self._pool if self._pool is not None else self._reactor.getThreadPool()
        chunks = body.chunks(self._chunk_size)
        try:
            stream.transport.write(b"zINSTREAM\0")
            while True:
                chunk = await threads.deferToThreadPool(self._reactor, pool, next, chunks, b"")
                if stream.reply.called:
                    break  # clamd answered early (a size limit): its answer says why
                if not chunk:
                    stream.transport.write(struct.pack("!L", 0))
                    break
                stream.transport.write(struct.pack("!L", len(chunk)) + chunk)
                await stream.writable()
        except BaseException:
            # Cancelled (the pipeline's timeout) or the body could not be read.
            stream.transport.abortConnection()
            raise
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                await threads.deferToThreadPool(self._reactor, pool, _close_quietly, close)
        return parse_reply(await stream.reply)


def _close_quietly(close) -> None:
    try:
        close()
    except ValueError:
        pass  # a cancelled read still runs the generator; it closes when collected


@implementer(IPolicyCheck)
@attrs.define
class VirusCheck:
    """The `clamd` check (see the module docstring)."""

    client: ClamdClient
    action: str = "reject"
    clock: object = None  # IReactorTime, for the scan's duration in the log
    name: str = "clamd"
    phases: tuple = (Phase.DATA,)

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"virus action must be one of {', '.join(ACTIONS)}")

    def check(self, phase: Phase, context: PolicyContext):
        if context.body is None:
            return Verdict.CONTINUE
        started = self.clock.seconds() if self.clock is not None else None
        d = self.client.scan(context.body)
        d.addCallback(self._scanned, context.queue_id, started)
        return d

    def _scanned(self, result: ScanResult, qid, started) -> Verdict:
        duration = None if started is None else self.clock.seconds() - started
        return self.verdict(result, qid, duration)

    def verdict(
        self, result: ScanResult, qid: str | None = None, duration: float | None = None
    ) -> Verdict:
        """The verdict for clamd's `result` (logged with the queue id)."""
        if result.virus is None and result.skipped:
            log.warn(
                "{qid}: clamd: not scanned: {why}",
                event="check",
                check=self.name,
                result="skipped",
                qid=qid,
                duration=duration,
                why=result.skipped,
            )
            header = f"X-Virus-Status: Unscanned, {result.skipped}\r\n".encode()
            return Verdict.continue_(headers=(header,))
        if result.virus is None:
            log.info(
                "{qid}: clamd: clean",
                event="check",
                check=self.name,
                result="clean",
                qid=qid,
                duration=duration,
            )
            return Verdict.CONTINUE
        log.warn(
            "{qid}: clamd: virus {virus} found ({action})",
            event="check",
            check=self.name,
            result="infected",
            qid=qid,
            duration=duration,
            virus=result.virus,
            action=self.action,
        )
        reason = f"virus found: {result.virus}"
        if self.action == "quarantine":
            header = f"X-Virus-Status: Infected, {result.virus}\r\n".encode("ascii", "replace")
            return Verdict.quarantine(reason, headers=(header,))
        return Verdict.reject(virus_reply(result.virus), reason)
