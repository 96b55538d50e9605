"""`QuotaStore`: any `IMailStore` with the users' quotas enforced and their usage
(``users.used_bytes``, and ``used_mb`` with it) kept true, once, above the backends.

The composition root wraps the configured store (Maildir, mbox, SQL, time-series,
a `RoutingStore` of them, an `EncryptingStore` around any) in one, and so does
`mta-admin mail delete`; no backend knows about quotas.

What a message counts for is its size as delivered: `StoreItem.size` (the delivery
headers and the message, CRLF line ends), before encryption.  Reading it back
measures the same (`counted_size`), so deleting gives back what delivery charged,
also for mbox, which keeps LF line ends.

Delivery costs one database transaction per batch:

1. an item marked `check_existing` whose copy is already in its mailbox (a crash
   between the store and the queue's record) is passed on uncharged;
2. one write transaction reads quota and usage of the batch's mailboxes, admits
   the items in order while they fit, and charges the admitted ones;
3. the inner store takes the admitted items;
4. what the store failed to take is given back (a second transaction, rare).

Charging before storing makes the decision exact even with several worker
processes (the write transaction serialises them).  A crash between 2 and 4 leaves
the usage too high by that batch, never too low, so it errs on the side of refusing;
``mta-admin user quota EMAIL --recount`` recomputes a mailbox from the store.

An item that does not fit is not stored: its outcome is `MailboxFull`, which local
delivery turns into a *permanent* failure, a ``5.2.2`` delivery status notification
for that recipient.  The message had passed the RCPT and DATA checks
(`mta.policy.quota`), so either concurrent mail filled the mailbox meanwhile or the
DATA check let it through for the other recipients.  Bouncing at once is what
Postfix's local delivery and Dovecot's LDA do by default (quota_full_tempfail =
no): the sender learns now, not after ``[queue] max_age`` of retries, and the queue
does not fill with mail for an abandoned mailbox.

When a delivery takes a mailbox's usage across 90% of its quota, a warning is
logged, once per crossing (not for each message above it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from zope.interface import implementer

from mta.db import Database, NoSuchUser, address_key
from mta.interfaces import IMailStore
from mta.observe.logging import Logger

__all__ = ["WARN_AT", "MailboxFull", "QuotaStore", "counted_size"]

log = Logger()

WARN_AT = 0.9  # the share of a quota that, once crossed, is logged


class MailboxFull(Exception):
    """The mailbox cannot take the message without going over its quota."""

    def __init__(self, mailbox, size: int, used: int, quota: int):
        # What the sender's bounce says: the numbers stay in the log.
        super().__init__(f"mailbox {mailbox} is over its quota")
        self.mailbox, self.size, self.used, self.quota = mailbox, size, used, quota


def counted_size(data: bytes) -> int:
    """What a stored message read back counts for: its length with CRLF line ends.

    Delivered messages end every line in CRLF (the spool normalises bare line
    ends); a store that keeps LF (mbox) gives them back one byte shorter per line."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


@implementer(IMailStore)
class QuotaStore:
    """`inner` with quotas; `database()` gives the `mta.db.Database` (blocking, like
    every method here: callers are on a thread pool or the CLI)."""

    def __init__(self, inner, database: Callable[[], Database]):
        self.inner = inner
        self.database = database
        self.name = inner.name

    # -- delivery ------------------------------------------------------------------

    def deliver_batch(self, items: Sequence) -> list:
        outcomes: list = [None] * len(items)
        charge: list[int] = []  # indexes of items to charge, in order
        passed: list[int] = []  # indexes handed to the inner store
        for i, stored in enumerate(self._already_stored(items)):
            if stored:
                passed.append(i)
            else:
                charge.append(i)
        if charge:
            try:
                refused = self._admit([items[i] for i in charge])
            except Exception as e:  # noqa: BLE001 (one outcome per item, never raise)
                log.error("quota accounting failed: {error!r}", error=e, event="quota_error")
                error = OSError(f"quota accounting failed: {e}")
                for i in charge:
                    outcomes[i] = error
                charge = []
            else:
                for n, i in enumerate(charge):
                    if refused[n] is not None:
                        outcomes[i] = refused[n]
                charge = [i for n, i in enumerate(charge) if refused[n] is None]
        passed = sorted(passed + charge)
        if not passed:
            return outcomes
        try:
            stored = self.inner.deliver_batch([items[i] for i in passed])
        except Exception as e:  # noqa: BLE001 (a store broke its promise not to raise)
            stored = [e] * len(passed)
        for i, outcome in zip(passed, stored):
            outcomes[i] = outcome
        self._refund(items, outcomes, set(charge))
        return outcomes

    def _already_stored(self, items: Sequence) -> list[bool]:
        """Per item: is it a `check_existing` one whose copy the mailbox has?  One
        question per mailbox where the store lists its tags at once (an optional
        ``delivered_tags(mailbox)``: a set, or None when it cannot), else one per item."""
        tags_of = getattr(self.inner, "delivered_tags", None)
        listed: dict = {}
        out = []
        for item in items:
            if not item.check_existing:
                out.append(False)
                continue
            try:
                if item.mailbox not in listed:
                    listed[item.mailbox] = None if tags_of is None else tags_of(item.mailbox)
                tags = listed[item.mailbox]
                if tags is None:  # this mailbox's store cannot list its tags
                    out.append(self.inner.has_delivered(item.mailbox, item.message_tag))
                else:
                    out.append(item.message_tag in tags)
            except Exception:  # noqa: BLE001 (the store reports it when it delivers)
                out.append(False)
        return out

    def _admit(self, items: list) -> list:
        """One transaction: admit and charge `items` in order; per item None (admitted)
        or the `MailboxFull` that refused it."""
        keys = [address_key(item.mailbox) for item in items]
        db = self.database()
        out: list = []
        with db.transaction():
            usage = db.quota_usage(keys)
            start = {key: used for key, (_, used) in usage.items()}
            used = dict(start)
            added: dict[str, int] = {}
            for key, item in zip(keys, items):
                if key not in usage:
                    out.append(None)  # not a user (deleted since it was queued)
                    continue
                quota, size = usage[key][0], item.size
                if quota is not None and used[key] + size > quota:
                    out.append(MailboxFull(item.mailbox, size, used[key], quota))
                    log.info(
                        "mailbox {mailbox} full: {used} of {quota} bytes used, {size} more"
                        " refused ({tag})",
                        event="quota_full",
                        mailbox=key,
                        used=used[key],
                        quota=quota,
                        size=size,
                        tag=item.message_tag,
                    )
                    continue
                used[key] += size
                added[key] = added.get(key, 0) + size
                out.append(None)
            db.add_usage(added)
        for key in added:
            quota = usage[key][0]
            if quota is not None and start[key] < WARN_AT * quota <= used[key]:
                log.warn(
                    "mailbox {mailbox} is {percent}% full: {used} of {quota} bytes",
                    event="quota_warning",
                    mailbox=key,
                    percent=int(100 * used[key] / quota),
                    used=used[key],
                    quota=quota,
                )
        return out

    def _refund(self, items: Sequence, outcomes: list, charged: set[int]) -> None:
        """Give back what was charged for items the inner store did not take."""
        back: dict[str, int] = {}
        for i in charged:
            if isinstance(outcomes[i], BaseException):
                key = address_key(items[i].mailbox)
                back[key] = back.get(key, 0) - items[i].size
        if back:
            try:
                self.database().add_usage(back)
            except Exception as e:  # noqa: BLE001 (the outcomes stand; usage stays high)
                log.error(
                    "could not give back the quota of failed deliveries: {error!r}",
                    error=e,
                    event="quota_error",
                )

    # -- reading and deleting ------------------------------------------------------

    def delete_message(self, mailbox, message_id: str) -> None:
        """Delete and give back what the message counted for."""
        size = self._counted(mailbox, message_id)
        self.inner.delete_message(mailbox, message_id)
        self.database().add_usage({address_key(mailbox): -size})

    def _counted(self, mailbox, message_id: str) -> int:
        try:
            return counted_size(self.inner.read_message(mailbox, message_id))
        except KeyError:
            raise
        except Exception:  # noqa: BLE001 (unreadable, e.g. a lost key: the stored size)
            for message in self.inner.list_messages(mailbox):
                if message.message_id == message_id:
                    return message.size
            raise KeyError(message_id) from None

    def recount(self, mailbox) -> int:
        """Recompute the usage of `mailbox` from what the store holds, store it, and
        return it (bytes).  Reads every message: an operator's repair, not a hot path."""
        total = 0
        for message in self.inner.list_messages(mailbox):
            try:
                total += self._counted(mailbox, message.message_id)
            except KeyError:  # deleted meanwhile
                continue
        self.database().set_usage(address_key(mailbox), total)
        return total

    def remove_mailbox(self, mailbox) -> bool:
        removed = self.inner.remove_mailbox(mailbox)
        if removed:
            try:
                self.database().set_usage(address_key(mailbox), 0)
            except NoSuchUser:
                pass  # a mailbox left behind by a deleted user
        return removed

    # -- the inner store's -----------------------------------------------------------

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self.inner.has_delivered(mailbox, message_tag)

    def create_mailbox(self, mailbox):
        return self.inner.create_mailbox(mailbox)

    def probe(self) -> str:
        return self.inner.probe()

    def list_messages(self, mailbox) -> list:
        return self.inner.list_messages(mailbox)

    def read_message(self, mailbox, message_id: str) -> bytes:
        return self.inner.read_message(mailbox, message_id)

    def __getattr__(self, name):  # close, search, mailbox_path, ...: the inner store's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
