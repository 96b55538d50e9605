"""Removing header fields from a message still being received (`SpoolFile.remove_headers`).

A message in memory (the common case, under 256 KB) is edited in place on the
reactor: one join and one scan of at most that much.  A message that spilled (to
``queue/tmp/<qid>``, or ``queue/pg-spill/<qid>`` on the PostgreSQL queue) is
rewritten on the queue's thread: its edited header section and then the rest of
the old file, read through its `FileBody` (so a sealed spill is read in clear and
sealed again under a new data key, `mta.crypto.stream`), go to ``<qid>.edit``,
renamed over the old one, so at every moment the spill is one whole message.  Called when a check saw a field to remove, or (spamd, for a message
too big to scan) did not look: then only the head is read and the file is left
alone when nothing matches.
"""

from __future__ import annotations

import itertools
import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from mta.crypto.stream import Sealer, seal_stream
from mta.fileio import write_all
from mta.headers import header_end, remove_fields

# The most of a spilled message read to find its header section: a message whose
# header section is longer keeps the fields past this point.
HEAD_LIMIT = 1024 * 1024
_CHUNK = 256 * 1024
EDIT_SUFFIX = ".edit"  # the rewritten file, until it is renamed over the spill
_NEW_FLAGS = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def edit_chunks(chunks: list[bytes], matches) -> tuple[list[bytes], int, int]:
    """(new chunks, fields removed, bytes removed) for a message held in memory."""
    data = b"".join(chunks)
    end = header_end(data)
    head = data if end is None else data[:end]
    new_head, removed = remove_fields(head, matches)
    if not removed:
        return chunks, 0, 0
    return [new_head, data[len(head) :]], removed, len(head) - len(new_head)


def edit_file(body, path: str, length: int, matches, keyring, qid: str):
    """Thread: rewrite the spilled message at `path` without the matching fields.

    `body` is the `FileBody` over it (clear text, whether or not the file is
    sealed), `length` its clear length.  None when no field matched (the file is
    untouched); else (fd of the new file now at `path`, positioned at its end for
    the commit's trailer; fields removed; its new length; its `Sealer`, end sealed,
    when `keyring` seals the spool, else None)."""
    head = body.header_block(HEAD_LIMIT)
    new_head, removed = remove_fields(head, matches)
    if not removed:
        return None
    sealer = Sealer(keyring, qid) if keyring is not None else None
    pieces = itertools.chain((new_head,), _after(body, len(head)))
    out = seal_stream(sealer, pieces) if sealer is not None else pieces
    tmp = path + EDIT_SUFFIX
    fd = os.open(tmp, _NEW_FLAGS, 0o600)
    try:
        for piece in out:
            write_all(fd, [piece])
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return fd, removed, length - (len(head) - len(new_head)), sealer


def _after(body, skip: int):
    """The clear bytes of `body` after its first `skip`."""
    chunks = body.chunks(_CHUNK)
    try:
        for chunk in chunks:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:] if skip else chunk
            skip = 0
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class HeaderEditing:
    """`ISpoolFile.remove_headers` for the spool files of both queues (the file
    spool's `SpoolFile`, the PostgreSQL queue's `PGSpoolFile`), through the
    receiving state they share (`mta.queue.spill.SpillingFile`): `qid`, `size`,
    `buffered`, `_chunks`, `_fd`, `_closed`, `_editing`.  A subclass says where its
    spill is and how to run the rewrite (`_edit_where`: reactor, thread pool, path,
    keyring or None) and takes the rewritten file's `Sealer` when it seals
    (`_edit_adopt`)."""

    def remove_headers(self, matches) -> Deferred:
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed, aborted or busy")
        if self._fd is None:
            self._chunks, removed, cut = edit_chunks(self._chunks, matches)
            self.size -= cut
            self.buffered -= cut
            return succeed(removed)
        body = self.body()  # flushes (and, sealed, seals the end)
        reactor, pool, path, keyring = self._edit_where()
        fd, self._fd, self._editing = self._fd, None, True
        d = deferToThreadPool(
            reactor, pool, edit_file, body, path, self.size, matches, keyring, self.qid
        )
        return d.addBoth(self._edited, fd, path)

    def _edit_where(self):
        raise NotImplementedError

    def _edit_adopt(self, sealer) -> None:
        """The rewritten file is sealed by `sealer`, its end sealed already."""

    def _edited(self, result, fd: int, path: str):
        self._editing = False
        new_fd = fd
        if isinstance(result, tuple):
            new_fd = result[0]
            os.close(fd)  # its file was replaced
        if self._closed:  # aborted while the thread worked
            os.close(new_fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        else:
            self._fd = new_fd
            if isinstance(result, tuple):
                _, _, self.size, sealer = result
                if sealer is not None:
                    self._edit_adopt(sealer)
        if isinstance(result, Failure):
            return result
        return result[1] if isinstance(result, tuple) else 0
