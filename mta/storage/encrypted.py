"""`EncryptingStore`: any `IMailStore` holding encrypted blobs (`mta.storage.crypto`).

Delivery reads each message (prefix, then `item.body.chunks()`) into memory, seals
it there and hands the inner store a `SealedBody` over the ciphertext: clear text
never reaches the disk.  Messages are bounded by ``[limits] max_message_size``, so
holding one in memory is fine.  `read_message` gives back the decrypted message;
`list_messages` reports the sizes of the stored blobs (the clear text is 105
bytes plus the length of the message tag shorter).  Everything else is the inner store's.

The message tag is authenticated in the blob; `read_message` also checks that the
store's id names that tag (``Q<tag>.``: Maildir and the time-series archive put it
in their file names), so two blobs of one mailbox cannot be swapped either.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from mta.interfaces import IMailStore
from mta.storage import crypto
from mta.storage.items import BytesBody, StoreItem, read_whole

_log = Logger()


class SealedBody(BytesBody):
    """An encrypted blob as an `IMessageBody`: it has no header section."""

    def header_block(self, limit: int = 65536) -> bytes:
        return b""


@implementer(IMailStore)
class EncryptingStore:
    """`inner` storing each message as an AES-256-GCM blob under `keyring`."""

    def __init__(self, inner, keyring: crypto.Keyring):
        self.inner = inner
        self.keyring = keyring
        self.name = inner.name

    def _refresh(self) -> None:
        """Follow `mta-admin key rotate`; a key file caught mid-change (or broken)
        leaves the keys already loaded in use, and is read again next time."""
        try:
            self.keyring.refresh()
        except crypto.KeyringError as e:
            _log.warn("cannot re-read the storage keys: {error}", error=str(e))

    def _seal(self, item: StoreItem):
        data = read_whole(item.body, item.prefix)
        blob = crypto.encrypt(self.keyring, item.mailbox, item.message_tag, data)
        return StoreItem(item.mailbox, item.message_tag, b"", SealedBody(blob), item.check_existing)

    def deliver_batch(self, items) -> list:
        self._refresh()
        outcomes: list = [None] * len(items)
        sealed, where = [], []
        for i, item in enumerate(items):
            try:
                sealed.append(self._seal(item))
                where.append(i)
            except Exception as e:  # noqa: BLE001 (one outcome per item, never raise)
                outcomes[i] = e
        for i, outcome in zip(where, self.inner.deliver_batch(sealed) if sealed else []):
            outcomes[i] = outcome
        return outcomes

    def read_message(self, mailbox, message_id: str) -> bytes:
        blob = self.inner.read_message(mailbox, message_id)
        self._refresh()
        tag, data = crypto.decrypt(self.keyring, mailbox, blob)
        if f"Q{tag}." not in message_id:
            raise crypto.DecryptionError(
                f"message was altered: {message_id} holds the message of tag {tag!r}"
            )
        return data

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self.inner.has_delivered(mailbox, message_tag)

    def delivered_tags(self, mailbox):
        """The inner store's `delivered_tags`, when it has one (else None)."""
        tags_of = getattr(self.inner, "delivered_tags", None)
        return None if tags_of is None else tags_of(mailbox)

    def create_mailbox(self, mailbox):
        return self.inner.create_mailbox(mailbox)

    def remove_mailbox(self, mailbox) -> bool:
        return self.inner.remove_mailbox(mailbox)

    def probe(self) -> str:
        self._refresh()
        return f"{self.inner.probe()}, encrypted (key {self.keyring.current})"

    def list_messages(self, mailbox) -> list:
        return self.inner.list_messages(mailbox)

    def delete_message(self, mailbox, message_id: str) -> None:
        self.inner.delete_message(mailbox, message_id)

    def __getattr__(self, name):  # mailbox_path, ...: the inner store's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
