"""`SpillingFile`: a message being received, in memory and then in a spill file.

Both queues receive the same way, so they share this one implementation: the
file spool's `mta.queue.spoolfile.SpoolFile` (its spill is ``queue/tmp/<qid>``)
and the PostgreSQL queue's `mta.queue.pgspool.PGSpoolFile` (``queue/pg-spill/<qid>``).
The body stays in memory up to the queue's memory limit (256 KB), then the file is
created and what arrives is written 64 KiB at a time.  With a keyring
(``[queue] encrypt``) the spill is sealed as it is written (`mta.crypto.stream`:
the header, then each 64 KiB segment once it is full, the last one when the body
ends), so nothing of the message reaches the disk in clear.  `body` gives the
end-of-message checks the bytes so far (sealing the end of a sealed spill, whose
segments are read whole); `remove_headers` (`mta.queue.headedit`) rewrites the
spill, sealed again when it was.  Each queue says where its spill goes and what a
commit does with it.
"""

from __future__ import annotations

import os

from mta.crypto.stream import Sealer
from mta.fileio import write_all
from mta.queue import headedit
from mta.queue.body import FileBody

SPILL_FLUSH = 64 * 1024


class SpillingFile(headedit.HeaderEditing):
    """One message being received.  `buffered` is the body bytes held in memory.

    A subclass gives `_memory_limit`, `_spill_path`, `_open_spill` (the new spill
    file's descriptor), `_keyring` (None: clear), `_edit_where`
    (`headedit.HeaderEditing`), `commit`, and may hook `_aborted`."""

    def __init__(self, qid: str):
        self.qid = qid
        self.size = 0
        self.buffered = 0
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._closed = False
        self._editing = False  # remove_headers' thread is rewriting the spill file
        self._sealer: Sealer | None = None  # a spilled body, with a keyring
        self._header_written = False
        self._sealed_end = False  # body() sealed the last segment: nothing more to write

    # -- what a queue says ----------------------------------------------------------------

    def _memory_limit(self) -> int:
        raise NotImplementedError

    def _spill_path(self) -> str:
        raise NotImplementedError

    def _open_spill(self) -> int:
        raise NotImplementedError

    def _keyring(self):
        raise NotImplementedError

    def _aborted(self) -> None:
        """Called once when the message is aborted."""

    # -- receiving ------------------------------------------------------------------------

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
            if self.buffered + len(data) <= self._memory_limit():
                self._chunks.append(data)
                self.buffered += len(data)
                return
            keyring = self._keyring()
            sealer = Sealer(keyring, self.qid) if keyring is not None else None
            self._fd = self._open_spill()
            self._sealer = sealer
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

    def _finish_spill(self) -> None:
        """Everything received is in the spill file (its end sealed, when sealed)."""
        if self._sealer is not None:
            if not self._sealed_end:
                self._flush(last=True)
        elif self._chunks:
            self._flush()

    def body(self) -> FileBody:
        """The bytes written so far, for end-of-message checks (see ISpoolFile)."""
        if self._closed:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        if self._fd is None:
            return FileBody(b"", None, self.size, list(self._chunks))
        self._finish_spill()  # segments are read whole: a sealed spill's end is sealed now
        opener = None if self._sealer is None else self._sealer.opener()
        return FileBody(b"", self._spill_path(), self.size, opener=opener)

    def _edit_adopt(self, sealer) -> None:
        self._sealer, self._header_written, self._sealed_end = sealer, True, True

    def _take(self, finish: bool = False) -> tuple[list[bytes], int | None]:
        """For the commit: closed now, (the chunks still in memory, the spill's fd);
        with `finish`, a spill holds everything first (`_finish_spill`)."""
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed, aborted or busy")
        if finish and self._fd is not None:
            self._finish_spill()
        self._closed = True
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        fd, self._fd = self._fd, None
        return chunks, fd

    def abort(self) -> None:
        if self._closed and self._fd is None:
            return
        self._closed = True
        self._aborted()
        self._chunks, self.buffered = [], 0
        if self._fd is not None:  # (none while remove_headers' thread has it: it cleans up)
            fd, self._fd = self._fd, None
            os.close(fd)
            try:
                os.unlink(self._spill_path())
            except FileNotFoundError:
                pass
