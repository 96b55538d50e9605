"""`SpoolFile`: one message being received, until the spool commits or drops it.

The session writes the body as it arrives; up to the spool's memory limit (256 KB)
it stays in memory, then it spills to ``queue/tmp/<qid>`` (sealed as it goes with
``[queue] encrypt``), as `mta.queue.spill` does for both queues.  `commit` hands a
`CommitJob` to `mta.queue.spool.Spool`, whose group commit makes it durable (it
appends what is still in memory, and the trailer, to the spill); `abort` forgets it.
`remove_headers` drops header fields a check named before the commit
(`mta.queue.headedit`).
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mta.interfaces import ISpoolFile
from mta.queue.spill import SpillingFile

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
class SpoolFile(SpillingFile):
    """One message being received into the file spool (`mta.queue.spill`)."""

    def __init__(self, spool, qid: str):  # spool: mta.queue.spool.Spool
        super().__init__(qid)
        self._spool = spool

    def _memory_limit(self) -> int:
        return self._spool.memory_limit

    def _spill_path(self) -> str:
        return self._spool.tmp_path(self.qid)

    def _open_spill(self) -> int:
        return os.open(self._spool.tmp_path(self.qid), OPEN_FLAGS, 0o600)

    def _keyring(self):
        return self._spool.keyring

    def _edit_where(self):
        keyring = self._spool.keyring if self._sealer is not None else None
        path = self._spool.tmp_path(self.qid)
        return self._spool.reactor, self._spool._pool, path, keyring

    def commit(self, envelope, trace_headers: bytes = b"") -> Deferred:
        chunks, fd = self._take()  # the spool appends the rest with the trailer
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

    def _aborted(self) -> None:
        self._spool._live.discard(self.qid)
