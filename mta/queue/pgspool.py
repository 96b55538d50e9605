"""Receiving into the PostgreSQL queue: `PGSpoolFile`, and the group commit.

A message being received stays in memory up to 256 KB, then spills to a private
file under ``<datadir>/queue/pg-spill/`` (named by its queue id, which carries the
pid, so a later start removes what a dead process left).  `commit` hands it to the
store's `BatchWorker`: commits that arrive while a batch is in PostgreSQL go
together in the next one, in ONE transaction (entry rows, recipient rows, body
chunks), so a busy node pays one round trip and one WAL flush per batch.  The 250
after DATA waits for that transaction's COMMIT.  A spilled body is streamed into
``queue_bodies`` a 1 MiB chunk at a time, so a large message is never held whole.
If the transaction fails, every message in it is refused with a 451 and nothing of
them stays in PostgreSQL.  Before the transaction, `mta.queue.pgbody.Places.stage`
seals each body (``[queue] encrypt``) and, when ``[storage.s3]`` is configured,
puts it in S3 (`mta.queue.s3body`); a body S3 refuses is refused alone.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mta.fileio import pid_alive, write_all
from mta.interfaces import ISpoolFile
from mta.queue import headedit, pgseal, pgsql
from mta.queue.body import FileBody
from mta.queue.ids import is_queue_id, pid_of
from mta.queue.pgbody import file_pieces

MEMORY_LIMIT = 256 * 1024
_SPILL_FLUSH = 64 * 1024
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


class CommitJob:
    """What one commit needs in the pool thread."""

    __slots__ = (
        "qid",
        "envelope",
        "trace_headers",
        "length",
        "chunks",
        "fd",
        "path",
        "created",
        "lease_until",
        "ref",
        "sealer",
        "stored_trace",
    )

    def __init__(self, qid, envelope, trace_headers, length, chunks, fd, path, created):
        self.qid = qid
        self.envelope = envelope
        self.trace_headers = trace_headers
        self.length = length
        self.chunks = chunks
        self.fd = fd
        self.path = path
        self.created = created
        # Set by the store when this node takes the entry at once: its lease's end.
        self.lease_until: float | None = None
        # Set by `mta.queue.pgbody.Places.stage`: where the body goes, its sealer.
        self.ref = "pg"
        self.sealer = None
        self.stored_trace = self.trace_headers

    def pieces(self):
        if self.fd is None:
            return iter(self.chunks)
        return file_pieces(self.fd, self.length)

    def seal(self, sealer) -> None:
        """Store the body and trace headers sealed by `sealer` (`[queue] encrypt`)."""
        self.sealer = sealer
        self.stored_trace = sealer.seal_extra(self.trace_headers)

    @property
    def seal_header(self) -> bytes | None:
        return None if self.sealer is None else self.sealer.header

    def stored_pieces(self):
        """What is stored of the body (its segments when sealed): read once."""
        if self.sealer is None:
            return self.pieces()
        return pgseal.sealed_body(self.sealer, self.pieces())

    def stored_length(self) -> int:
        return self.length if self.sealer is None else pgseal.sealed_size(self.length)

    def discard_spill(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            _unlink(self.path)


@implementer(ISpoolFile)
class PGSpoolFile(headedit.HeaderEditing):
    """One message being received into the PostgreSQL queue."""

    def __init__(self, store, qid: str):
        self.qid = qid
        self.size = 0
        self.buffered = 0
        self._store = store
        self._chunks: list[bytes] = []
        self._fd: int | None = None
        self._closed = False
        self._editing = False

    def _path(self) -> str:
        return os.path.join(self._store.spill_dir, self.qid)

    def _edit_where(self):
        return self._store.reactor, self._store._pool, self._path(), None

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        if not isinstance(data, bytes):
            data = bytes(data)
        if not data:
            return
        self.size += len(data)
        if self._fd is None:
            if self.buffered + len(data) <= self._store.memory_limit:
                self._chunks.append(data)
                self.buffered += len(data)
                return
            os.makedirs(self._store.spill_dir, mode=0o700, exist_ok=True)
            self._fd = os.open(self._path(), _OPEN_FLAGS, 0o600)
        elif self.buffered + len(data) <= _SPILL_FLUSH:
            self._chunks.append(data)
            self.buffered += len(data)
            return
        self._chunks.append(data)
        self._flush()

    def _flush(self) -> None:
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        try:
            write_all(self._fd, chunks)
        except OSError:
            self.abort()
            raise

    def body(self) -> FileBody:
        if self._closed:
            raise ValueError(f"spool file {self.qid} already committed or aborted")
        if self._fd is None:
            return FileBody(b"", None, self.size, list(self._chunks))
        if self._chunks:
            self._flush()
        return FileBody(b"", self._path(), self.size)

    def commit(self, envelope, trace_headers: bytes = b"") -> Deferred:
        if self._closed or self._editing:
            raise ValueError(f"spool file {self.qid} already committed, aborted or busy")
        if self._fd is not None and self._chunks:
            self._flush()
        self._closed = True
        chunks, self._chunks, self.buffered = self._chunks, [], 0
        fd, self._fd = self._fd, None
        job = CommitJob(
            self.qid,
            envelope,
            bytes(trace_headers),
            self.size,
            chunks,
            fd,
            self._path() if fd is not None else None,
            envelope.received_at or self._store.reactor.seconds(),
        )
        return self._store._commit(job)

    def abort(self) -> None:
        if self._closed and self._fd is None:
            return
        self._closed = True
        self._chunks, self.buffered = [], 0
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            _unlink(self._path())


def commit_batch(conn, places, jobs: list[CommitJob], owner: str) -> None:
    """Thread, inside one transaction: insert every job (`places` staged them:
    `mta.queue.pgbody.Places`); wake other nodes when some are not leased to this one."""
    unleased = any(job.lease_until is None for job in jobs)
    if any(job.fd is not None for job in jobs):
        # A spilled body goes a chunk at a time, each sent before the next is read
        # (a pipeline would buffer them all in libpq).
        for job in jobs:
            _insert(conn, places, job, owner)
    else:
        with conn.pipeline():  # small messages: one round trip for the whole batch
            for job in jobs:
                _insert(conn, places, job, owner)
    if unleased:
        pgsql.notify(conn, owner)


def _insert(conn, places, job: CommitJob, owner: str | None, status: str = "active") -> None:
    pgsql.insert_entry(
        conn,
        qid=job.qid,
        envelope=job.envelope,
        trace_headers=job.stored_trace,
        body_length=job.length,
        size=job.length + len(job.trace_headers),
        created=job.created,
        lease_owner=owner if job.lease_until is not None else None,
        lease_until=job.lease_until,
        body_ref=job.ref,
        seal_header=job.seal_header,
        status=status,
    )
    places.save(conn, job)


def insert_held(conn, places, job: CommitJob) -> None:
    """One job's entry inserted on hold (`mta.queue.pgcontrol.hold_message`)."""
    _insert(conn, places, job, None, "hold")


def clean_spill(spill_dir: str) -> int:
    """Remove spill files of processes that no longer run; how many."""
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        pid = pid_of(name) if is_queue_id(name) else None
        if pid is not None and pid != (os.getpid() & 0xFFFFFF) and not pid_alive(pid):
            _unlink(os.path.join(spill_dir, name))
            removed += 1
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
