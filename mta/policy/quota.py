"""Mailbox quotas at RCPT and at the end of DATA: refuse what a mailbox cannot take
before the message is ours, so the client (not a bounce) tells the sender.

Quotas and usage come from the `IUserDirectory` (`quota_usage`): from memory when
nobody has a quota, else usage read once per change of the database.  A message
counts for its size with the trace headers delivery adds (`mta.storage.quota`);
here the announced or received size stands for it, a few hundred bytes short.

- RCPT: with ``SIZE=`` announced at MAIL (0 when not), a mailbox whose quota the
  message alone exceeds gets ``552 5.2.2`` (it will never fit, RFC 1870 6.2); one
  where used + SIZE exceeds the quota, or that is already full, gets ``452 4.2.2``
  (the user may make room; the client retries).  A recipient that is an alias of
  several mailboxes is refused only when none of them can take the message: the
  others should not lose their copy for one full mailbox.
- DATA: the real size is known.  When every recipient of the message is over
  quota, ``552 5.2.2``.  When only some are (no SIZE= given, or a SIZE= that lied),
  there is one reply for the whole transaction (SMTP, unlike LMTP, has no
  per-recipient answer after DATA), and refusing would deny the recipients who
  have room.  So the message is accepted, and delivery finds those mailboxes full
  and fails them with a ``5.2.2`` delivery status notification, as Postfix does when
  its local delivery agent finds a mailbox over its size limit.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.verdict import Phase, PolicyContext, Verdict

log = Logger()

MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full: the recipient is over quota, try again later")
MESSAGE_TOO_BIG = Reply(552, "5.2.2", "Mailbox full: the message exceeds the recipient's quota")
ALL_OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full: every recipient is over quota")

_CONTINUE = Verdict.CONTINUE
_RCPT = Phase.RCPT


def refusal(quota: int, used: int, size: int) -> Reply | None:
    """Why a mailbox with `quota` and `used` bytes cannot take `size` more: the
    reply for that, or None when it can.  A full mailbox takes nothing, even when
    the size is unknown (0)."""
    if size > quota:
        return MESSAGE_TOO_BIG
    if used + max(size, 1) > quota:
        return MAILBOX_FULL
    return None


@implementer(IPolicyCheck)
class QuotaCheck:
    """The quota rule over `directory` (an `IUserDirectory`); after the relay
    check, which has refused unknown recipients already."""

    name = "quota"
    phases = (Phase.RCPT, Phase.DATA)

    def __init__(self, directory):
        self._directory = directory

    def check(self, phase: Phase, context: PolicyContext):
        if phase is _RCPT:
            mailboxes = self._directory.resolve(context.recipient)
            if isinstance(mailboxes, defer.Deferred):
                return mailboxes.addCallback(self._rcpt, context)
            return self._rcpt(mailboxes, context)
        return self._then(context.recipients, _data_verdict, context)

    def _rcpt(self, mailboxes, context: PolicyContext):
        if not mailboxes:
            return _CONTINUE  # not local: no quota (unknown ones are the relay check's)
        return self._then(mailboxes, _rcpt_verdict, context)

    def _then(self, mailboxes, decide, context: PolicyContext):
        usage = self._directory.quota_usage(mailboxes)
        if isinstance(usage, defer.Deferred):
            return usage.addCallback(decide, mailboxes, context)
        return decide(usage, mailboxes, context)


def _rcpt_verdict(usage: dict, mailboxes, context: PolicyContext) -> Verdict:
    if len(usage) < len(mailboxes):
        return _CONTINUE  # a mailbox without a quota takes it
    replies = [refusal(quota, used, context.size) for quota, used in usage.values()]
    if not replies or any(reply is None for reply in replies):
        return _CONTINUE
    if all(reply is MESSAGE_TOO_BIG for reply in replies):
        return Verdict.reject(MESSAGE_TOO_BIG, f"{context.recipient}: message exceeds quota")
    return Verdict.tempfail(MAILBOX_FULL, f"{context.recipient}: over quota")


def _data_verdict(usage: dict, mailboxes, context: PolicyContext) -> Verdict:
    if not usage:
        return _CONTINUE
    size = context.size
    over = [m for m, (quota, used) in usage.items() if refusal(quota, used, size) is not None]
    if not over:
        return _CONTINUE
    if len(over) == len(mailboxes):
        return Verdict.reject(ALL_OVER_QUOTA, f"{size} bytes: every recipient over quota")
    log.info(
        "accepting {queue_id} for {count} recipient(s); over quota, bounced at delivery: {over}",
        event="quota_partial",
        queue_id=context.queue_id,
        count=len(mailboxes) - len(over),
        over=", ".join(str(m) for m in over),
    )
    return _CONTINUE
