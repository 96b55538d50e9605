"""Receiving into the PostgreSQL queue: `PGSpoolFile`, and the group commit.

A message being received stays in memory up to 256 KB, then spills to a private
file under ``<datadir>/queue/pg-spill/`` (named by its queue id, which carries the
pid, so a later start removes what a dead process left), as in the file spool
(`mta.queue.spill`).  With ``[queue] encrypt`` the spill is sealed as it is
written, in the format the store keeps (`mta.queue.pgseal`: the same segments,
bound to the same queue id), so nothing of the message is on the disk in clear
and the commit stores the sealed segments as they are, with no decryption and no
second sealing (only the data key is re-wrapped when the master key was rotated
meanwhile, `CommitJob.follow_key`).  `commit` hands it to the
store's `BatchWorker`: commits that arrive while a batch is in PostgreSQL go
together in the next one, in ONE transaction (entry rows, recipient rows, body
chunks), so a busy node pays one round trip and one WAL flush per batch.  The 250
after DATA waits for that transaction's COMMIT.  A spilled body is streamed into
``queue_bodies`` a 1 MiB chunk at a time, so a large message is never held whole.
If the transaction fails, every message in it is refused with a 451 and nothing of
them stays in PostgreSQL.  Before the transaction, `mta.queue.pgbody.Places.stage`
seals each body not sealed yet (``[queue] encrypt``) and, when ``[storage.s3]`` is configured,
puts it in S3 (`mta.queue.s3body`); a body S3 refuses is refused alone.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from zope.interface import implementer

from mta.crypto import stream
from mta.fileio import pid_alive
from mta.interfaces import ISpoolFile
from mta.queue import headedit, pgseal, pgsql
from mta.queue.ids import is_queue_id, pid_of
from mta.queue.pgbody import file_pieces
from mta.queue.spill import SpillingFile

MEMORY_LIMIT = 256 * 1024
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
        "seal_header",
        "stored_trace",
        "sealed_spill",
    )

    def __init__(
        self, qid, envelope, trace_headers, length, chunks, fd, path, created, spill_sealer=None
    ):
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
        self.seal_header: bytes | None = None  # the sealer's header (key id, wrapped key)
        self.stored_trace = self.trace_headers
        # The spill file (`fd`) holds the body sealed by `spill_sealer`, end included:
        # the header, then the very segments the store keeps.
        self.sealed_spill = spill_sealer is not None
        if spill_sealer is not None:
            self.seal(spill_sealer)

    def pieces(self):
        if self.fd is None:
            return iter(self.chunks)
        return file_pieces(self.fd, self.length)

    def seal(self, sealer) -> None:
        """Store the body and trace headers sealed by `sealer` (`[queue] encrypt`)."""
        self.sealer = sealer
        self.seal_header = sealer.header
        self.stored_trace = sealer.seal_extra(self.trace_headers)

    def follow_key(self, keyring) -> None:
        """Thread: a body sealed as it arrived, under a master key that is no longer
        the current one (rotated meanwhile, and maybe retired: the retire re-wrapped
        the entries already stored, not this one), gets its data key wrapped under
        the current key; the segments stay as they are.  Raises DecryptionError
        when the old key is gone already (the message is refused with a 451)."""
        header = self.seal_header
        if header is not None and stream.header_key_id(header) != keyring.current:
            self.seal_header = stream.rewrap(keyring, header, f"queued message {self.qid}")

    def stored_pieces(self):
        """What is stored of the body (its segments when sealed): read once."""
        if self.sealed_spill:  # sealed as it arrived: its segments are stored as they are
            return file_pieces(self.fd, self.stored_length(), start=stream.HEADER_SIZE)
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
class PGSpoolFile(SpillingFile):
    """One message being received into the PostgreSQL queue (`mta.queue.spill`)."""

    def __init__(self, store, qid: str):
        super().__init__(qid)
        self._store = store

    def _memory_limit(self) -> int:
        return self._store.memory_limit

    def _spill_path(self) -> str:
        return os.path.join(self._store.spill_dir, self.qid)

    def _open_spill(self) -> int:
        os.makedirs(self._store.spill_dir, mode=0o700, exist_ok=True)
        return os.open(self._spill_path(), _OPEN_FLAGS, 0o600)

    def _keyring(self):
        return self._store.bodies.keyring

    def _edit_where(self):
        keyring = self._store.bodies.keyring if self._sealer is not None else None
        return self._store.reactor, self._store._pool, self._spill_path(), keyring

    def commit(self, envelope, trace_headers: bytes = b"") -> Deferred:
        chunks, fd = self._take(finish=True)  # a spill holds the whole body, sealed
        job = CommitJob(
            self.qid,
            envelope,
            bytes(trace_headers),
            self.size,
            chunks,
            fd,
            self._spill_path() if fd is not None else None,
            envelope.received_at or self._store.reactor.seconds(),
            self._sealer if fd is not None else None,
        )
        return self._store._commit(job)


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
    """Remove spill files of processes that no longer run (``<qid>``, and
    ``<qid>.edit`` of a `remove_headers` cut short); how many."""
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        qid = name.removesuffix(headedit.EDIT_SUFFIX)
        pid = pid_of(qid) if is_queue_id(qid) else None
        if pid is not None and pid != (os.getpid() & 0xFFFFFF) and not pid_alive(pid):
            _unlink(os.path.join(spill_dir, name))
            removed += 1
    return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
