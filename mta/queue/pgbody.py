"""Message bodies of the PostgreSQL queue: where they are kept, and `PGBody`.

A body is kept in ``queue_bodies`` as numbered ``bytea`` chunks of at most 1 MiB, so
neither side ever holds a large message whole: the spool streams a spilled body
into it a chunk at a time, and `PGBody` reads it back a chunk at a time.

`PGBodies` is the seam for other places a body can live (``queue_entries.body_ref``
names it: ``pg`` today; S3 objects are another backend with the same three
methods, chosen when ``[storage.s3]`` is configured).  Nothing outside this package
sees any of it: delivery, bounces and DKIM read through `IMessageBody`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

from zope.interface import implementer

from mta.fileio import write_all
from mta.interfaces import IMessageBody
from mta.queue.body import ShortMessage

CHUNK = 1024 * 1024


def rechunk(pieces: Iterable[bytes], size: int = CHUNK) -> Iterator[bytes]:
    """`pieces` regrouped into chunks of exactly `size` bytes (the last may be
    shorter), holding at most one chunk plus one piece."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def file_pieces(fd: int, length: int, size: int = CHUNK) -> Iterator[bytes]:
    """Bytes [0, length) of `fd`, `size` at a time (a spilled body)."""
    offset = 0
    while offset < length:
        data = os.pread(fd, min(size, length - offset), offset)
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
            for seq, chunk in enumerate(rechunk(pieces)):
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


@implementer(IMessageBody)
class PGBody:
    """`prefix` (trace headers) then the `length` stored bytes of `qid`, read through
    `connections` (an `mta.queue.pgconn.Connections`); or `memory` right after the
    commit, until the queue calls `forget_memory`."""

    __slots__ = ("prefix", "qid", "length", "_connections", "_bodies", "_memory")

    def __init__(
        self,
        prefix: bytes,
        qid: str,
        length: int,
        connections,
        bodies: PGBodies | None = None,
        memory: Sequence[bytes] | None = None,
    ):
        self.prefix = prefix
        self.qid = qid
        self.length = length
        self._connections = connections
        self._bodies = bodies or PGBodies()
        self._memory = memory

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
        left, seq = self.length, 0
        while left > 0:
            chunk = self._connections.run(self._bodies.read, self.qid, seq)
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
