"""Local delivery: queued message -> a mail store, one result per recipient.

Recipients arrive as final mailboxes (aliases were expanded before queueing).  Each
copy gets ``Return-Path:`` and ``Delivered-To:`` prepended, then the message's trace
headers, then the body, copied by the store from the queue file (or, for a small
message right after it was queued, written from the copy still in memory).

Throughput comes from batching: calls made while a batch runs in the thread pool
are gathered into the next batch, and a store with ``deliver_batch`` (Maildir)
fsyncs each distinct ``new/`` once per batch.  Storage trouble (full disk, quota,
permissions, I/O error) is *transient*: the message stays queued and is retried; an
unusable mailbox name is a permanent failure.  A bug defers, never bounces.

For an entry recovered after a restart (or retried after a failure) the store is
asked first whether the copy is already there, so a crash between the mailbox
rename and the queue's status record never delivers twice.
"""

from __future__ import annotations

import errno

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mta.envelope import DeliveryResult, RecipientState, Reply
from mta.interfaces import IDeliveryAgent
from mta.observe.logging import Logger
from mta.storage.maildir import DeliveryItem, UnsafeMailboxName

log = Logger()

_MAX_BATCH = 256
_STORAGE_REPLIES = {
    errno.ENOSPC: Reply(452, "4.3.1", "insufficient system storage"),
    errno.EDQUOT: Reply(452, "4.2.2", "mailbox full"),
    errno.EACCES: Reply(451, "4.3.0", "mailbox not accessible"),
    errno.EPERM: Reply(451, "4.3.0", "mailbox not accessible"),
    errno.EROFS: Reply(451, "4.3.0", "mail storage is read-only"),
    errno.EIO: Reply(451, "4.3.0", "I/O error in mail storage"),
}


def delivery_prefix(entry, recipient) -> bytes:
    """Return-Path and Delivered-To for one copy, followed by the trace headers."""
    head = f"Return-Path: {entry.envelope.sender.path}\r\nDelivered-To: {recipient}\r\n"
    return head.encode("utf-8") + entry.trace_headers


def result_for(recipient, outcome) -> DeliveryResult:
    """Map a store outcome (a location or an exception) to a DeliveryResult."""
    if not isinstance(outcome, BaseException):
        return DeliveryResult(
            recipient,
            RecipientState.DELIVERED,
            f"stored in {outcome}",
            Reply(250, "2.0.0", "delivered"),
        )
    if isinstance(outcome, UnsafeMailboxName):
        reply = Reply(550, "5.1.1", "mailbox name not allowed")
        return DeliveryResult(recipient, RecipientState.FAILED, f"{reply}: {outcome}", reply)
    if isinstance(outcome, OSError):
        reply = _STORAGE_REPLIES.get(outcome.errno, Reply(451, "4.3.0", "mail storage error"))
        return DeliveryResult(
            recipient, RecipientState.DEFERRED, f"{reply}: {outcome.strerror or outcome}", reply
        )
    reply = Reply(451, "4.3.0", "local delivery error")
    return DeliveryResult(recipient, RecipientState.DEFERRED, f"{reply}: {outcome!r}", reply)


@implementer(IDeliveryAgent)
class LocalDelivery:
    """Delivers into `store` (an IMailStore) on `threadpool`, batching calls."""

    def __init__(
        self,
        store,
        hostname: str,
        threadpool,
        reactor,
        *,
        lanes: int = 2,
        max_batch: int = _MAX_BATCH,
    ):
        self.store = store
        self.hostname = hostname
        self._pool = threadpool
        self._reactor = reactor
        self._max_batch = max_batch
        self._lanes = max(1, lanes)
        self._pending: list[tuple[list[DeliveryItem], Deferred]] = []
        self._running = 0
        self._firing = 0
        self.batches = 0

    def deliver(self, entry, recipients) -> Deferred:
        check = entry.recovered or entry.attempts > 0
        items = [
            DeliveryItem(
                rcpt,
                entry.message_tag(rcpt),
                delivery_prefix(entry, rcpt),
                entry.path,
                entry.body_length,
                check,
                None if check else entry.body,
            )
            for rcpt in recipients
        ]
        d: Deferred = Deferred()
        self._pending.append((items, d))
        self._fill()
        return d

    def _fill(self) -> None:
        # Up to `lanes` batches at once (concurrent fsyncs share journal commits);
        # while results are being delivered, new calls wait to form one batch.
        while self._pending and not self._firing and self._running < self._lanes:
            self._start()

    def _start(self) -> None:
        batch: list[tuple[list[DeliveryItem], Deferred]] = []
        count = 0
        while self._pending and (not batch or count + len(self._pending[0][0]) <= self._max_batch):
            job = self._pending.pop(0)
            batch.append(job)
            count += len(job[0])
        self._running += 1
        self.batches += 1
        items = [item for job_items, _ in batch for item in job_items]
        d = deferToThreadPool(self._reactor, self._pool, self._store_batch, items)
        d.addBoth(self._finished, batch)

    def _store_batch(self, items: list[DeliveryItem]) -> list:
        """Thread: deliver everything, one outcome (path or exception) per item."""
        batch = getattr(self.store, "deliver_batch", None)
        if batch is not None:
            return batch(items)
        outcomes: list = []
        for item in items:
            try:
                if item.check_existing and self.store.has_delivered(item.mailbox, item.message_tag):
                    outcomes.append("(already delivered)")
                    continue
                outcomes.append(
                    self.store.deliver(
                        item.mailbox, item.message_tag, item.prefix, item.source_path, item.length
                    )
                )
            except Exception as e:
                outcomes.append(e)
        return outcomes

    def _finished(self, outcomes, batch) -> None:
        if not isinstance(outcomes, list):
            log.failure("local delivery batch failed", failure=outcomes)
            err = RuntimeError(outcomes.getErrorMessage())
            outcomes = [err] * sum(len(items) for items, _ in batch)
        pos = 0
        self._firing += 1
        for items, d in batch:
            results = []
            for item in items:
                outcome = outcomes[pos]
                pos += 1
                if isinstance(outcome, BaseException) and not isinstance(
                    outcome, OSError | UnsafeMailboxName
                ):
                    log.error(
                        "unexpected local delivery error for {recipient}: {error!r}",
                        recipient=str(item.mailbox),
                        error=outcome,
                    )
                results.append(result_for(item.mailbox, outcome))
            d.callback(results)
        self._firing -= 1
        self._running -= 1
        self._fill()
