"""What the stores that keep each message in a file of its own (Maildir, the
date-hierarchy archive) share: reading and deleting one message by its id, given
the store's `_message_path(mailbox, message_id)` (KeyError for an id it cannot
have made) and its `_fsync`."""

from __future__ import annotations

import os

from mta.fileio import fsync_dir


class OneFilePerMessage:
    def read_message(self, mailbox, message_id: str) -> bytes:
        try:
            with open(self._message_path(mailbox, message_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError(message_id) from None

    def delete_message(self, mailbox, message_id: str) -> None:
        path = self._message_path(mailbox, message_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise KeyError(message_id) from None
        fsync_dir(os.path.dirname(path), self._fsync)
