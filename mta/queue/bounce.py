"""`Bouncer`: writes delivery status notifications back into the queue.

Who is reported, and what a DSN says, are the pure functions of `mta.queue.dsn`;
this module reads what it needs of the original (its headers, or the whole message
for RET=FULL) through the entry's `IMessageBody` on the thread pool, and commits
ONE DSN per call through the spool like any received message, from the null sender
to the original sender (DESIGN.md: "bounces re-enter through the spool").  The
message is copied in chunks, so memory stays bounded.

Loops are impossible by construction: no DSN is ever written for a message whose
sender is null (`notify` refuses; the runner dead-letters such failures).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.threads import deferToThreadPool

from mta.envelope import NULL_ADDRESS, BodyType, Envelope
from mta.observe.logging import Logger
from mta.queue.dsn import (
    FAILED,
    FULL,
    HEADERS,
    MAX_HEADERS,
    MAX_RETURN,
    TOO_BIG,
    FailedRecipient,
    dsn_frame,
    failure_reports,
    normalize_headers,
)
from mta.queue.entry import QueueEntry

log = Logger()

_COPY_CHUNK = 256 * 1024


def read_original_headers(entry: QueueEntry, limit: int = MAX_HEADERS) -> bytes:
    """Blocking: the trace headers plus the header block of the queued message."""
    return entry.body.header_block(limit)


def _next_chunk(chunks) -> bytes:
    """Blocking: the next chunk of a body iterator, b"" at the end."""
    return next(chunks, b"")


class Bouncer:
    """Writes DSNs into `spool` (an `mta.queue.spool.Spool`); `threadpool` reads the
    original off the queue file.  RET=FULL returns at most `max_return` bytes."""

    def __init__(self, spool, hostname: str, reactor, threadpool, *, max_return: int = MAX_RETURN):
        self.spool = spool
        self.hostname = hostname
        self.reactor = reactor
        self.threadpool = threadpool
        self.max_return = max_return

    async def bounce(self, entry: QueueEntry) -> str | None:
        """Queue a failure DSN for the failed recipients of `entry` that want one; its
        queue id, or None when there is nothing to report."""
        return await self.notify(entry, failure_reports(entry))

    async def notify(self, entry: QueueEntry, recipients: Sequence[FailedRecipient]) -> str | None:
        """Queue one DSN about `recipients` (from the *_reports functions) to the
        sender of `entry`; its queue id, or None when `recipients` is empty.  Never
        for a null sender (ValueError)."""
        sender = entry.envelope.sender
        if sender.is_null:
            raise ValueError(f"{entry.qid}: refusing to report on a message from the null sender")
        if not recipients:
            return None
        env = entry.envelope
        returned = HEADERS
        if env.dsn_ret == "FULL" and any(r.action == FAILED for r in recipients):
            returned = FULL if entry.size <= self.max_return else TOO_BIG
        headers = b""
        if returned != FULL:
            headers = await self._headers(entry)
        now = self.reactor.seconds()
        qid = self.spool.new_queue_id()
        front, back = dsn_frame(
            hostname=self.hostname,
            qid=entry.qid,
            sender=sender,
            arrival=env.received_at or entry.created,
            now=now,
            recipients=recipients,
            boundary=f"{qid}/{self.hostname}",
            message_id=f"{qid}.dsn@{self.hostname}",
            envid=env.dsn_envid,
            returned=returned,
            original_size=entry.size,
        )
        eight_bit = not front.isascii()
        spool_file = self.spool.open(qid)
        try:
            spool_file.write(front)
            if returned == FULL:
                await self._copy_message(entry, spool_file)
                eight_bit = eight_bit or env.body is not BodyType.SEVEN_BIT or env.smtputf8
            else:
                body = normalize_headers(headers)
                eight_bit = eight_bit or not body.isascii()
                spool_file.write(body)
            spool_file.write(back)
        except BaseException:
            spool_file.abort()
            raise
        envelope = Envelope(
            sender=NULL_ADDRESS,
            recipients=(sender,),
            helo=self.hostname,
            listener="bounce",
            body=BodyType.EIGHT_BIT if eight_bit else BodyType.SEVEN_BIT,
            smtputf8=sender.is_utf8 or (eight_bit and env.smtputf8),
            received_at=now,
        )
        await spool_file.commit(envelope, b"")
        log.info(
            "{qid}: DSN {bounce_qid} queued to {sender} for {recipients}",
            qid=entry.qid,
            bounce_qid=qid,
            sender=str(sender),
            recipients=[str(r.final) for r in recipients],
            actions=sorted({r.action for r in recipients}),
            returned=returned,
            event="bounced" if any(r.action == FAILED for r in recipients) else "dsn_queued",
        )
        return qid

    async def _headers(self, entry: QueueEntry) -> bytes:
        try:
            return await deferToThreadPool(
                self.reactor, self.threadpool, read_original_headers, entry
            )
        except OSError as e:
            log.warn(
                "{qid}: original headers unreadable for the DSN: {error}",
                qid=entry.qid,
                error=str(e),
                event="bounce_headers_missing",
            )
            return entry.trace_headers

    async def _copy_message(self, entry: QueueEntry, spool_file) -> None:
        """The whole original, trace headers included, in bounded chunks."""
        chunks = entry.body.chunks(_COPY_CHUNK)
        try:
            while True:
                chunk = await deferToThreadPool(self.reactor, self.threadpool, _next_chunk, chunks)
                if not chunk:
                    return
                spool_file.write(chunk)
        finally:
            await deferToThreadPool(self.reactor, self.threadpool, chunks.close)
