"""Mail stores behind one interface (`mta.interfaces.IMailStore`).

`open_store(config)` is the one place that turns `[storage] backend` into a store;
local delivery, the health probe and `mta-admin` receive what it returns and use
nothing but the interface.  The value types every backend shares live here too.
"""

from __future__ import annotations

import attrs

from mta.storage.names import UnsafeMailboxName, safe_component

__all__ = [
    "BACKENDS",
    "StoreItem",
    "StoredMessage",
    "UnsafeMailboxName",
    "UnknownBackend",
    "open_store",
    "safe_component",
]

BACKENDS = ("maildir",)


class UnknownBackend(ValueError):
    """`[storage] backend` names a store this build does not have."""


@attrs.frozen
class StoreItem:
    """One message for one mailbox: `prefix` (Return-Path, Delivered-To) then `body`
    (an `IMessageBody`).  `message_tag` is unique per (queue id, recipient)."""

    mailbox: object  # an mta.envelope.Address
    message_tag: str
    prefix: bytes
    body: object  # IMessageBody
    check_existing: bool = False

    @property
    def size(self) -> int:
        return len(self.prefix) + self.body.size


@attrs.frozen
class StoredMessage:
    """What `IMailStore.list_messages` says of one stored message."""

    message_id: str  # the store's own id for read_message / delete_message
    size: int
    received: float  # seconds since the epoch
    folder: str = "INBOX"


def open_store(config, *, fsync=None):
    """The `IMailStore` that `config`'s ``[storage]`` asks for."""
    backend = config.storage.backend
    if backend == "maildir":
        from mta.storage.maildir import MaildirStore

        kwargs = {} if fsync is None else {"fsync": fsync}
        return MaildirStore(config.path("mail"), config.hostname, **kwargs)
    raise UnknownBackend(
        f"[storage] backend = {backend!r} is not available (choose one of {', '.join(BACKENDS)})"
    )
