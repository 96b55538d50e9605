"""The value types every mail store shares (what crosses the `IMailStore` seam)."""

from __future__ import annotations

import os

import attrs
from zope.interface import implementer

from mta.interfaces import IMessageBody


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


def read_whole(body, prefix: bytes = b"") -> bytes:
    """`prefix` and all of `body` (an `IMessageBody`) at once.  OSError when the body
    is not as long as recorded: its queue file changed under us."""
    chunks = body.chunks()
    try:
        data = prefix + b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    if len(data) != len(prefix) + body.size:
        raise OSError(
            f"message body is not as long as recorded (read {len(data) - len(prefix)}"
            f" of {body.size} bytes)"
        )
    return data


@attrs.frozen
class StoredMessage:
    """What `IMailStore.list_messages` says of one stored message."""

    message_id: str  # the store's own id for read_message / delete_message
    size: int
    received: float  # seconds since the epoch
    folder: str = "INBOX"


@implementer(IMessageBody)
class BytesBody:
    """A message held in memory as an `IMessageBody`: one read back from a store
    for another (`mta-admin mail export`), or an encrypted blob (`SealedBody`)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def header_block(self, limit: int = 65536) -> bytes:
        head = self.data[:limit]
        ends = [i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0]
        if ends:
            end = min(ends)
            return head[: end + (2 if head[end : end + 2] == b"\r\n" else 1)]
        return head[: head.rfind(b"\n") + 1]

    def chunks(self, chunk_size: int = 262144):
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]

    def copy_into(self, fd: int, prefix: bytes = b"") -> int:
        view = memoryview(prefix + self.data)
        total = len(view)
        while view:
            view = view[os.write(fd, view) :]
        return total
