"""`SpoolFile`: one message being received into the file spool (see `mta.queue.spool`).

Bodies stay in memory up to the spool's `memory_limit` (256 KB), then spill to
``queue/tmp/<qid>``; `commit` hands the spool a `_CommitJob` for its group commit.
`remove_headers` drops header fields a check named before the commit
(`mta.queue.headedit`).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.fileio import write_all
from mta.interfaces import ISpoolFile
from mta.queue import headedit
from mta.queue.body import FileBody
from mta.queue.files import unlink_quietly

MEMORY_LIMIT = 256 * 1024
_SPILL_FLUSH = 64 * 1024
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_unlink_quietly = unlink_quietly


class _CommitJob:
    __slots__ = (
        "qid",
        "tmp_path",
        "fd",
        "chunks",
        "envelope",
        "trace_headers",
        "length",
        "created",
        "in_memory",
        "file_size",
    )

    def __init__(self, qid, tmp_path, fd, chunks, envelope, trace_headers, length, created):
        self.qid = qid
        self.tmp_path = tmp_path
        self.fd = fd
        self.chunks = chunks
        self.envelope = envelope
        self.trace_headers = trace_headers
        self.length = length
        self.created = created
        self.in_memory = fd is None  # `chunks` is the whole body (never spilled)
        self.file_size = 0


@implementer(ISpoolFile)
class SpoolFile:
    """One message being received.  `buffered` is the body bytes held in memory."""

    def __init__(self, spool, qid: str):  # spool: mta.queue.spool.Spool
        self.qid = qid
        self.size = 0
        self.buffered = 0
        self._spool = spool
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._closed = False
        self._editing = False

    @property
    def spilled(self) -> bool:
        return self._fd is not None

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        self.size += len(data)
        if self._fd is None:
            if self.buffered + len(data) <= self._spool.memory_limit:
                self._chunks.append(data)
                self.buffered += len(data)
                return
            self._fd = os.open(self._spool.tmp_path(self.qid), _OPEN_FLAGS, 0o600)
        elif self.buffered + len(data) <= _SPILL_FLUSH:
            self._chunks.append(data)
            self.buffered += len(data)
            return
        self._chunks.append(data)
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        try:
            write_all(self._fd, chunks)
        except OSError:
            self.abort()
            raise

    def body(self) -> FileBody:
        """The bytes written so far, for end-of-message checks (see ISpoolFile)."""
        if self._closed:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        if self._fd is None:
            return FileBody(b"", None, self.size, list(self._chunks))
        if self._chunks:
            chunks, self._chunks, self.buffered = self._chunks, [], 0
            try:
                write_all(self._fd, chunks)
            except OSError:
                self.abort()
                raise
        return FileBody(b"", self._spool.tmp_path(self.qid), self.size)

    def remove_headers(self, matches) -> Deferred:
        """Drop the header fields `matches` name (see ISpoolFile and mta.queue.headedit)."""
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed, aborted or busy")
        if self._fd is None:
            self._chunks, removed, cut = headedit.edit_chunks(self._chunks, matches)
            self.size -= cut
            self.buffered -= cut
            return succeed(removed)
        self.body()  # flush what is buffered
        fd, self._fd, self._editing = self._fd, None, True
        path = self._spool.tmp_path(self.qid)
        d = deferToThreadPool(
            self._spool.reactor, self._spool._pool, headedit.edit_file, path, fd, self.size, matches
        )

        def settle(result):
            self._editing = False
            new_fd, removed, size = result if isinstance(result, tuple) else (fd, 0, self.size)
            if new_fd != fd:
                os.close(fd)
            if self._closed:  # aborted while the thread worked
                os.close(new_fd)
                _unlink_quietly(path)
            else:
                self._fd, self.size = new_fd, size
            return result if isinstance(result, Failure) else removed

        return d.addBoth(settle)

    def commit(self, envelope, trace_headers: bytes = b"") -> Deferred:
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        self._closed = True
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        fd, self._fd = self._fd, None
        return self._spool._commit(
            _CommitJob(
                self.qid,
                self._spool.tmp_path(self.qid),
                fd,
                chunks,
                envelope,
                bytes(trace_headers),
                self.size,
                envelope.received_at or self._spool.reactor.seconds(),
            )
        )

    def abort(self) -> None:
        if self._closed and self._fd is None:
            return
        self._closed = True
        if self._editing:
            self._spool._live.discard(self.qid)
            return  # remove_headers' thread still holds the file: it cleans up
        self._spool._live.discard(self.qid)
        self._chunks, self.buffered = [], 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            try:
                os.unlink(self._spool.tmp_path(self.qid))
            except FileNotFoundError:
                pass
