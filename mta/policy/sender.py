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
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer

from mta.db import Database, address_key
from mta.envelope import Address, Reply

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
