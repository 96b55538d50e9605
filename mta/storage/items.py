"""The value types every mail store shares (what crosses the `IMailStore` seam)."""

from __future__ import annotations

import attrs


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
