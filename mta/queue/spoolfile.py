"""`SpoolFile`: one message being received, until the spool commits or drops it.

The session writes the body as it arrives; up to the spool's memory limit (256 KB)
it stays in memory, then it spills to ``queue/tmp/<qid>`` (sealed as it goes with
``[queue] encrypt``, see `mta.crypto.stream`).  `commit` hands a `CommitJob` to
`mta.queue.spool.Spool`, whose group commit makes it durable; `abort` forgets it.
`remove_headers` drops header fields a check named before the commit
(`mta.queue.headedit`).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mta.crypto.stream import Sealer
from mta.fileio import write_all
from mta.interfaces import ISpoolFile
from mta.queue import headedit
from mta.queue.body import FileBody

SPILL_FLUSH = 64 * 1024
OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class CommitJob:
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
        "sealer",
        "sealed",
        "opener",
    )

    def __init__(
        self, qid, tmp_path, fd, chunks, envelope, trace_headers, length, created, sealer=None
    ):
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
        # Sealing (a keyring is set): the Sealer of a spilled body, already closed when
        # `chunks` is empty and body() sealed the end; the metadata's "sealed" table
        # and the opener the entry reads with, both made at commit.
        self.sealer = sealer
        self.sealed = None
        self.opener = None


@implementer(ISpoolFile)
class SpoolFile(headedit.HeaderEditing):
    """One message being received.  `buffered` is the body bytes held in memory."""

    def __init__(self, spool, qid: str):  # spool: mta.queue.spool.Spool
        self.qid = qid
        self.size = 0
        self.buffered = 0
        self._spool = spool
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._closed = False
        self._sealer: Sealer | None = None  # a spilled body, with a keyring
        self._header_written = False
        self._sealed_end = False  # body() sealed the last segment: nothing more to write
        self._editing = False  # remove_headers' thread is rewriting the spill file

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
        if self._sealed_end:
            raise ValueError(f"spool file {self.qid}: written after its end was sealed")
        self.size += len(data)
        if self._fd is None:
            if self.buffered + len(data) <= self._spool.memory_limit:
                self._chunks.append(data)
                self.buffered += len(data)
                return
            self._fd = os.open(self._spool.tmp_path(self.qid), OPEN_FLAGS, 0o600)
            if self._spool.keyring is not None:
                self._sealer = Sealer(self._spool.keyring, self.qid)
        elif self.buffered + len(data) <= SPILL_FLUSH:
            self._chunks.append(data)
            self.buffered += len(data)
            return
        self._chunks.append(data)
        self._flush()

    def _flush(self, last: bool = False) -> None:
        """Write the buffered chunks to the spill file (sealed, with a keyring; `last`
        seals the end of the body too)."""
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        sealer = self._sealer
        if sealer is not None:
            pieces = sealer.feed(chunks)
            if not self._header_written:
                pieces.insert(0, sealer.header)
                self._header_written = True
            if last:
                pieces.append(sealer.close())
                self._sealed_end = True
            chunks = pieces
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
        if self._sealer is not None:
            # Segments are read whole: seal the end now (commit appends only the trailer).
            if not self._sealed_end:
                self._flush(last=True)
            path = self._spool.tmp_path(self.qid)
            return FileBody(b"", path, self.size, opener=self._sealer.opener())
        if self._chunks:
            self._flush()
        return FileBody(b"", self._spool.tmp_path(self.qid), self.size)

    def _edit_where(self):
        keyring = self._spool.keyring if self._sealer is not None else None
        path = self._spool.tmp_path(self.qid)
        return self._spool.reactor, self._spool._pool, path, keyring

    def _edit_adopt(self, sealer) -> None:
        self._sealer, self._header_written, self._sealed_end = sealer, True, True

    def commit(self, envelope, trace_headers: bytes = b"") -> Deferred:
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        self._closed = True
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        fd, self._fd = self._fd, None
        return self._spool._commit(
            CommitJob(
                self.qid,
                self._spool.tmp_path(self.qid),
                fd,
                chunks,
                envelope,
                bytes(trace_headers),
                self.size,
                envelope.received_at or self._spool.reactor.seconds(),
                self._sealer,
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
