"""Local delivery: queued message -> a mail store, one result per recipient.

Recipients arrive as final mailboxes (aliases were expanded before queueing).  Each
copy gets ``Return-Path:`` and ``Delivered-To:`` prepended, then the message as the
queue's `IMessageBody` gives it (trace headers, body), which the store copies the
cheapest way the body allows.

Throughput comes from batching (`mta.process.batch.BatchWorker`): calls made while a batch
runs in the thread pool are gathered into the next one, handed to the store's
``deliver_batch`` at once (Maildir fsyncs each distinct ``new/`` once per batch).  Storage trouble (full disk, quota,
permissions, I/O error) is *transient*: the message stays queued and is retried; an
unusable mailbox name is a permanent failure.  A bug defers, never bounces.

For a message recovered after a restart (or retried after a failure) the store is
asked first whether the copy is already there, so a crash between the mailbox
rename and the queue's status record never delivers twice.

A mailbox over its quota (`mta.storage.quota.MailboxFull`, from the `QuotaStore`
the composition root wraps the store in) is a permanent failure, 5.2.2: that
module says why.
"""

from __future__ import annotations

import errno

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mta.envelope import DeliveryResult, RecipientState, Reply
from mta.interfaces import IDeliveryAgent
from mta.observe.logging import Logger
from mta.process.batch import BatchWorker
from mta.storage import StoreItem, UnsafeMailboxName
from mta.storage.quota import MailboxFull

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


def delivery_prefix(envelope, recipient) -> bytes:
    """Return-Path and Delivered-To for one copy (the message's own trace headers
    follow, from its body)."""
    return f"Return-Path: {envelope.sender.path}\r\nDelivered-To: {recipient}\r\n".encode()


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
    if isinstance(outcome, MailboxFull):
        reply = Reply(552, "5.2.2", "mailbox full")
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
        self._batches = BatchWorker(
            reactor, threadpool, self._store_batch, lanes, max_batch, weight=len
        )

    @property
    def batches(self) -> int:
        return self._batches.batches

    def deliver(self, job, recipients) -> Deferred:
        check = job.may_be_delivered
        envelope, body = job.envelope, job.body
        items = [
            StoreItem(rcpt, job.message_tag(rcpt), delivery_prefix(envelope, rcpt), body, check)
            for rcpt in recipients
        ]
        return self._batches.submit(items).addCallback(self._results, items)

    def _store_batch(self, groups: list[list[StoreItem]]) -> list:
        """Thread: one store call for every item of every call in the batch."""
        items = [item for group in groups for item in group]
        try:
            outcomes = self.store.deliver_batch(items)
        except Exception as e:
            outcomes = [e] * len(items)
        out = []
        pos = 0
        for group in groups:
            out.append((True, outcomes[pos : pos + len(group)]))
            pos += len(group)
        return out

    @staticmethod
    def _results(outcomes: list, items: list[StoreItem]) -> list[DeliveryResult]:
        results = []
        for item, outcome in zip(items, outcomes):
            if isinstance(outcome, BaseException) and not isinstance(
                outcome, OSError | UnsafeMailboxName | MailboxFull
            ):
                log.error(
                    "unexpected local delivery error for {recipient}: {error!r}",
                    recipient=str(item.mailbox),
                    error=outcome,
                )
            results.append(result_for(item.mailbox, outcome))
        return results
