"""``[queue] encrypt`` on the PostgreSQL queue: bodies sealed wherever they live.

The body is sealed with the file spool's segment format (`mta.crypto.stream`:
AES-256-GCM segments of 64 KiB, a random data key wrapped under the keyring's
current master key, the queue id in every segment's authenticated data), so it is
written while it streams in and read back a segment at a time, in bounded memory,
from ``queue_bodies`` chunks or ranged S3 GETs alike.  The trace headers, stored in
``queue_entries.trace_headers``, are sealed with the same key (`seal_extra`).

One difference from the spool file: the sealed header (master key id, wrapped data
key, nonce prefix) is not stored in front of the segments but in its own column,
``queue_entries.seal_header`` (NULL: the body is clear).  The header is outside
the segments' authenticated data, so nothing is weakened; and `mta-admin key
retire` then re-wraps an entry with one UPDATE of that column (`rekey`), in a
transaction, whether the body is in PostgreSQL or in S3 -- no rewrite of a bytea
chunk, no GET and PUT of an S3 object, and no window where a body and its key
disagree.  Even an entry being delivered right now may be re-wrapped: the
segments do not change, and the attempt keeps the data key it unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from mta.crypto import stream
from mta.crypto.keys import DecryptionError

__all__ = ["SegmentReader", "clear_chunks", "open_seal", "rekey", "sealed_body", "sealed_size"]


def sealed_size(length: int) -> int:
    """Stored bytes (segments only, the header being apart) of a `length`-byte body."""
    return stream.stored_length(length) - stream.HEADER_SIZE


def sealed_body(sealer: stream.Sealer, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """The segments of `pieces` (not the header), produced as they are read."""
    for piece in pieces:
        yield from sealer.feed((piece,))
    yield sealer.close()


def open_seal(keyring, header: bytes, qid: str) -> stream.Opener:
    """The opener of `qid`'s body; DecryptionError without the key it names."""
    if keyring is None:
        raise DecryptionError(
            f"queued message {qid} is encrypted, and [queue] encrypt is off (no keyring)"
        )
    return stream.Opener.open_header(keyring, bytes(header), qid)


class SegmentReader:
    """`read(offset, size)` over stored chunks read in order (what
    `Opener.segments` asks for is sequential): at most one chunk plus one segment
    is held."""

    __slots__ = ("_chunks", "_buf", "_at")

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = bytearray()
        self._at = stream.HEADER_SIZE  # the opener counts the header in its offsets

    def read(self, offset: int, size: int) -> bytes:
        if offset != self._at:
            raise DecryptionError("queued message segments read out of order")
        while len(self._buf) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buf += chunk
        out = bytes(self._buf[:size])
        del self._buf[:size]
        self._at += len(out)
        return out

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def clear_chunks(opener: stream.Opener, stored: Iterator[bytes], length: int) -> Iterator[bytes]:
    """The clear body (`length` bytes) of the stored segments `stored`."""
    reader = SegmentReader(stored)
    try:
        for clear in opener.segments(reader.read, length):
            if clear:
                yield clear
    finally:
        reader.close()


def rekey(conn, keyring, key_id: str, dry_run: bool = False) -> int:
    """Re-wrap every entry sealed under `key_id` under the keyring's current key
    (one UPDATE of ``seal_header`` each, in the caller's transaction); how many
    (with `dry_run`, how many would be).  Raises DecryptionError."""
    rows = conn.execute(
        "SELECT id, seal_header FROM queue_entries WHERE seal_header IS NOT NULL"
        " AND substring(seal_header from %s for %s) = %s FOR UPDATE",
        (len(stream.MAGIC) + 2, len(bytes.fromhex(key_id)), bytes.fromhex(key_id)),
    ).fetchall()
    count = 0
    for qid, header in rows:
        header = bytes(header)
        if stream.header_key_id(header) != key_id:
            continue
        count += 1
        if not dry_run:
            new = stream.rewrap(keyring, header, f"queued message {qid}")
            conn.execute("UPDATE queue_entries SET seal_header = %s WHERE id = %s", (new, qid))
    return count
