"""Which MAIL FROM addresses an authenticated user may use (RFC 6409 section 6.1).

A user may send as:
- the null reverse-path `<>` (bounces, read receipts);
- its own address (the username, compared case-insensitively);
- an alias whose targets include the user (`sales@ -> alice@` lets alice send as
  sales@; one level, the way Postfix's smtpd_sender_login_maps is usually built);
- anything at all when the user has the `send_as_any` flag (service accounts,
  `mta-admin user set-send-as EMAIL any`).

Everything else is refused with `SENDER_NOT_OWNED` (553 5.7.1).  The lookups are
blocking SQLite reads, so `check` runs them through `run_in_thread` (the database
pool); it answers from memory only for the two cases that need no lookup.
`SenderCheck` is the rule as an `IPolicyCheck` at MAIL, for authenticated sessions.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from zope.interface import implementer

from mta.db import Database, address_key
from mta.envelope import Address, Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict

log = Logger()

SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by user")


def may_send_as(db: Database, username: str, sender: Address) -> bool:
    """The rule itself, blocking (a pool thread or mta-admin)."""
    if sender.is_null:
        return True
    user = username.strip().lower()
    key = address_key(sender)
    if key == user:
        return True
    if db.send_as_any(user):
        return True
    return any(target.lower() == user for target in db.alias_targets(key))


class SenderPolicy:
    """`check(username, sender)` -> Deferred[Reply | None]: None when allowed."""

    def __init__(self, db: Callable[[], Database], run_in_thread: Callable[..., defer.Deferred]):
        self._db = db
        self._run = run_in_thread

    def check(self, username: str, sender: Address) -> defer.Deferred:
        if sender.is_null or address_key(sender) == username.strip().lower():
            return defer.succeed(None)
        d = self._run(lambda: may_send_as(self._db(), username, sender))
        d.addCallback(lambda allowed: None if allowed else SENDER_NOT_OWNED)
        return d


@implementer(IPolicyCheck)
class SenderCheck:
    """MAIL: an authenticated user may only use the senders `policy` allows.

    `policy` is anything with `check(username, sender)` -> Deferred[Reply | None]
    (a `SenderPolicy`, or `mta.testing.FakeSenderPolicy`).  Unauthenticated
    sessions, the null sender and the user's own address are answered at once.
    """

    name = "sender"
    phases = (Phase.MAIL,)

    def __init__(self, policy):
        self._policy = policy

    def check(self, phase: Phase, context: PolicyContext):
        user = context.authenticated_as
        sender = context.sender
        if not user or sender is None or sender.is_null:
            return Verdict.ACCEPT
        if address_key(sender) == user.strip().lower():
            return Verdict.ACCEPT  # the user's own address: no lookup, no Deferred
        d = self._policy.check(user, sender)
        return d.addCallback(self._decided, context)

    def _decided(self, refusal: Reply | None, context: PolicyContext) -> Verdict:
        if refusal is None:
            return Verdict.ACCEPT
        log.info(
            "sender <{sender}> refused for {user}",
            event="sender_refused",
            sender=str(context.sender),
            user=context.authenticated_as,
            client=context.client_address,
        )
        return Verdict(Action.REJECT if refusal.code >= 500 else Action.TEMPFAIL, refusal)
