"""Message bodies of the PostgreSQL queue: where they are kept (`Places`), and `PGBody`.

A body is kept in ``queue_bodies`` as numbered ``bytea`` chunks of at most 1 MiB, so
neither side ever holds a large message whole: the spool streams a spilled body
into it a chunk at a time, and `PGBody` reads it back a chunk at a time.  When
``[storage.s3]`` is configured, new bodies go to S3 instead (`mta.queue.s3body`,
read back with ranged GETs of the same 1 MiB).  ``queue_entries.body_ref`` names
where each one is (``pg``, ``s3``), so an entry written before S3 was configured
(or after it was removed) stays readable as long as its place is reachable.  With
``[queue] encrypt`` bodies are sealed wherever they go (`mta.queue.pgseal`).
Nothing outside this package sees any of it: delivery, bounces and DKIM read
through `IMessageBody`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator, Sequence

from zope.interface import implementer

from mta.crypto.stream import Sealer
from mta.fileio import regroup, write_all
from mta.interfaces import IMessageBody
from mta.observe.logging import Logger
from mta.queue import pgseal, pgsql
from mta.queue.body import ShortMessage

CHUNK = 1024 * 1024
_log = Logger()


def file_pieces(fd: int, length: int, size: int = CHUNK, start: int = 0) -> Iterator[bytes]:
    """Bytes [start, start + length) of `fd`, `size` at a time (a spilled body)."""
    offset, end = start, start + length
    while offset < end:
        data = os.pread(fd, min(size, end - offset), offset)
        if not data:
            raise ShortMessage("spilled message body")
        offset += len(data)
        yield data


class PGBodies:
    """Bodies in the ``queue_bodies`` table (``body_ref = 'pg'``).  Blocking."""

    ref = "pg"

    def save(self, conn, qid: str, pieces: Iterable[bytes]) -> str:
        """Store the body inside the caller's transaction; the body_ref."""
        with conn.cursor() as cur:
            for seq, chunk in enumerate(regroup(pieces, CHUNK)):
                cur.execute(
                    "INSERT INTO queue_bodies (entry_id, seq, data) VALUES (%s, %s, %s)",
                    (qid, seq, chunk),
                )
        return self.ref

    def read(self, conn, qid: str, seq: int) -> bytes | None:
        row = conn.execute(
            "SELECT data FROM queue_bodies WHERE entry_id = %s AND seq = %s", (qid, seq)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def delete(self, conn, qid: str) -> None:
        """Nothing to do: the rows go with their entry (ON DELETE CASCADE)."""


class Places:
    """Where bodies go and are read from: ``queue_bodies`` always (older entries),
    S3 when `s3` (an `mta.queue.s3body.S3Bodies`) is given; sealed with `keyring`
    when given.  The commit batch calls `stage` then, in its transaction, `save`."""

    def __init__(self, s3=None, keyring=None):
        self.pg = PGBodies()
        self.s3 = s3
        self.keyring = keyring

    def stage(self, jobs: Sequence) -> dict[int, Exception]:
        """Thread, before the transaction: seal each `mta.queue.pgspool.CommitJob`
        (with a keyring; one whose spill was sealed as it arrived is sealed already),
        and upload its body (to S3); errors by ``id(job)``."""
        errors: dict[int, Exception] = {}
        if self.keyring is not None:
            _refresh(self.keyring)
        for job in jobs:
            job.ref = self.pg.ref if self.s3 is None else self.s3.ref
            if self.keyring is not None:
                try:
                    if job.sealer is None:
                        job.seal(Sealer(self.keyring, job.qid))
                    else:
                        job.follow_key(self.keyring)
                except Exception as e:  # noqa: BLE001 (one outcome per job)
                    errors[id(job)] = e
        if self.s3 is not None:
            todo = [job for job in jobs if id(job) not in errors]
            by_qid = {job.qid: job for job in todo}
            uploads = [(job.qid, job.stored_pieces(), job.stored_length()) for job in todo]
            for qid, error in self.s3.put_all(uploads).items():
                errors[id(by_qid[qid])] = error
        return errors

    def unstage(self, jobs: Sequence) -> None:
        """The transaction failed: delete the objects `stage` wrote (best effort)."""
        if self.s3 is not None:
            self.s3.delete_all(job.qid for job in jobs if job.ref == self.s3.ref)

    def save(self, conn, job) -> None:
        """In the transaction: a body bound for ``queue_bodies`` goes there."""
        if job.ref == self.pg.ref:
            self.pg.save(conn, job.qid, job.stored_pieces())

    def forget(self, found: Iterable[tuple[str, str]]) -> None:
        """After their rows are gone: delete the S3 objects of (queue id, ref)."""
        qids = [qid for qid, ref in found if ref == "s3"]
        if qids and self.s3 is not None:
            self.s3.delete_all(qids)

    def read(self, connections, ref: str, qid: str, seq: int) -> bytes | None:
        if ref == self.pg.ref:
            return connections.run(self.pg.read, qid, seq)
        if ref == "s3" and self.s3 is not None:
            return self.s3.read(qid, seq)
        raise OSError(
            errno.EIO,
            f"queued message {qid}: its body is in {ref!r}, and no [storage.s3] is configured",
        )

    def opener(self, header: bytes | None, qid: str):
        """The opener of a sealed body (`header` from the row), None for a clear one;
        the DecryptionError itself when it cannot be opened (raised on reading)."""
        if header is None:
            return None
        try:
            return pgseal.open_seal(self.keyring, header, qid)
        except Exception as e:  # noqa: BLE001
            return e

    def probe(self) -> str:
        return "" if self.s3 is None else self.s3.probe()

    def sweep(self, connections, now: float) -> int:
        """Delete the S3 objects left without a row (`S3Bodies.sweep`); how many."""
        if self.s3 is None:
            return 0
        count = self.s3.sweep(lambda qids: connections.run(pgsql.existing, qids), now)
        if count:
            _log.info("removed {count} orphaned queue bodies", count=count, event="swept")
        return count

    def close(self) -> None:
        if self.s3 is not None:
            self.s3.close()


def _refresh(keyring) -> None:
    """Pick up a rotated key (`mta-admin key rotate`); a failure keeps the old one."""
    try:
        keyring.refresh()
    except Exception:  # noqa: BLE001 (sealing goes on under the key already read)
        pass


@implementer(IMessageBody)
class PGBody:
    """`prefix` (trace headers) then the `length` stored bytes of `qid`, read through
    `connections` (an `mta.queue.pgconn.Connections`); or `memory` right after the
    commit, until the queue calls `forget_memory`."""

    __slots__ = ("prefix", "qid", "length", "ref", "_connections", "_places", "_memory", "_seal")

    def __init__(
        self,
        prefix: bytes,
        qid: str,
        length: int,
        connections,
        places: Places | None = None,
        memory: Sequence[bytes] | None = None,
        *,
        ref: str = "pg",
        seal=None,
    ):
        self.prefix = prefix
        self.qid = qid
        self.length = length
        self.ref = ref
        self._connections = connections
        self._places = places or Places()
        self._memory = memory
        # None (clear), the body's `mta.crypto.stream.Opener`, or why it has none.
        self._seal = seal

    @property
    def size(self) -> int:
        return len(self.prefix) + self.length

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def forget_memory(self) -> None:
        self._memory = None

    def _stored(self) -> Iterator[bytes]:
        if self._memory is not None:
            yield from (c for c in self._memory if c)
            return
        if self._seal is None:
            yield from self._raw(self.length)
            return
        if isinstance(self._seal, Exception):
            raise self._seal
        yield from pgseal.clear_chunks(
            self._seal, self._raw(pgseal.sealed_size(self.length)), self.length
        )

    def _raw(self, length: int) -> Iterator[bytes]:
        left, seq = length, 0
        while left > 0:
            chunk = self._places.read(self._connections, self.ref, self.qid, seq)
            if not chunk:
                raise ShortMessage(f"queued message {self.qid}")
            chunk = chunk[:left]
            left -= len(chunk)
            seq += 1
            yield chunk

    # -- IMessageBody -------------------------------------------------------------

    def header_block(self, limit: int = 65536) -> bytes:
        head = bytearray(self.prefix)
        if len(head) < limit:
            stored = self._stored()
            try:
                for chunk in stored:
                    head += chunk
                    if len(head) >= limit or b"\r\n\r\n" in head:
                        break
            finally:
                stored.close()
        head = bytes(head[:limit])
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2]
        if len(head) >= limit or len(head) < self.size:
            cut = head.rfind(b"\r\n")
            return head[: cut + 2] if cut >= 0 else b""
        return head if head.endswith(b"\r\n") or not head else head + b"\r\n"

    def chunks(self, chunk_size: int = 262144) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        for chunk in self._stored():
            for i in range(0, len(chunk), chunk_size):
                yield chunk[i : i + chunk_size]

    def copy_into(self, fd: int, prefix: bytes = b"") -> int:
        written = write_all(fd, [prefix, self.prefix])
        for chunk in self._stored():
            written += write_all(fd, [chunk])
        if written != len(prefix) + self.size:
            raise ShortMessage(f"queued message {self.qid}")
        return written
