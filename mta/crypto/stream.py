"""Queued messages sealed segment by segment: the spool's format with ``[queue] encrypt``.

A queued message is written while it arrives (bodies over 256 KB spill to the disk
before the end of DATA) and read back in bounded memory by delivery, so one
AES-GCM blob over the whole message (the stores' format, `mta.storage.crypto`) does
not fit: it would need the whole message in memory on both sides.  The body is
sealed instead as a sequence of segments, each its own AES-256-GCM message (the
construction of Tink's streaming AEAD and of age's payload), so each segment is
written as soon as it is full and authenticated on its own when read::

    b"MTAQ" | 0x01 | key id (8) | wrap nonce (12) | wrapped data key (48) | nonce prefix (7)
    segment 0 | segment 1 | ... | last segment

Segment i seals bytes [i*SEGMENT, (i+1)*SEGMENT) of the message under the message's
random data key with the nonce ``prefix | i (4 bytes, big endian) | last (1 byte)``
and the authenticated data ``header | queue id``; every segment but the last holds
exactly SEGMENT bytes, the last fewer (possibly none) and is flagged last.  So the
stored size follows from the message size (`stored_length`), a truncated,
reordered or extended file fails to authenticate, and a body copied into another
queue file (another queue id) does too.  Small values that belong to the message but
live elsewhere (the trace headers, kept in the queue file's metadata) are sealed
with the same key under a counter no segment uses (`seal_extra`).

The data key is wrapped like the stores' data keys, under the key-encryption key of
the keyring's current master key (`mta.crypto.keys`), so `mta-admin key rotate`
applies to the spool too; a queued message keeps the key it was written under.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mta.crypto.keys import ID_SIZE, KEY_SIZE, DecryptionError, Keyring

MAGIC = b"MTAQ"
VERSION = 1
SEGMENT = 64 * 1024
TAG = 16
_PREFIX = 7
_WRAP_NONCE = 12
_WRAPPED = KEY_SIZE + TAG
HEADER_SIZE = len(MAGIC) + 1 + ID_SIZE + _WRAP_NONCE + _WRAPPED + _PREFIX
_EXTRA = 0xFFFFFFFF  # the counter of `seal_extra`; no message has 2**32 segments
_SEGMENT_NONCE = struct.Struct(">IB")


def stored_length(clear_length: int) -> int:
    """Bytes on disk for a message of `clear_length` bytes (header included)."""
    return HEADER_SIZE + clear_length + TAG * (clear_length // SEGMENT + 1)


def is_sealed(head: bytes) -> bool:
    return head[: len(MAGIC) + 1] == MAGIC + bytes([VERSION])


def _nonce(prefix: bytes, counter: int, last: int) -> bytes:
    return prefix + _SEGMENT_NONCE.pack(counter, last)


class Sealer:
    """Seals one message as it is written: `header`, then what `feed` and `close`
    return, in order, is the stored body."""

    __slots__ = ("header", "_aead", "_aad", "_prefix", "_counter", "_pending", "_closed")

    def __init__(self, keyring: Keyring, queue_id: str):
        key_id = keyring.current
        data_key = AESGCM.generate_key(bit_length=256)
        wrap_nonce, prefix = os.urandom(_WRAP_NONCE), os.urandom(_PREFIX)
        head = MAGIC + bytes([VERSION]) + bytes.fromhex(key_id)
        wrapped = keyring.kek(key_id).encrypt(wrap_nonce, data_key, head)
        self.header = head + wrap_nonce + wrapped + prefix
        self._aead = AESGCM(data_key)
        self._aad = self.header + queue_id.encode("ascii")
        self._prefix = prefix
        self._counter = 0
        self._pending = bytearray()
        self._closed = False

    def feed(self, chunks: Iterable[bytes]) -> list[bytes]:
        """The sealed segments that `chunks` complete (the rest waits for more)."""
        pending = self._pending
        for chunk in chunks:
            pending += chunk
        out: list[bytes] = []
        if len(pending) < SEGMENT:
            return out
        whole = len(pending) - len(pending) % SEGMENT
        view = memoryview(pending)
        try:
            for start in range(0, whole, SEGMENT):
                out.append(self._seal(view[start : start + SEGMENT], 0))
        finally:
            view.release()
        del pending[:whole]
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> bytes:
        """The last segment (what is still pending, possibly nothing)."""
        if self._closed:
            raise ValueError("sealer already closed")
        self._closed = True
        last = self._seal(bytes(self._pending), 1)
        self._pending = bytearray()
        return last

    def seal_all(self, chunks: Iterable[bytes]) -> list[bytes]:
        """Header, segments and last segment of a message given whole."""
        return [self.header, *self.feed(chunks), self.close()]

    def seal_extra(self, data: bytes) -> bytes:
        """`data` (a small value stored apart from the body) under this message's key."""
        return self._aead.encrypt(_nonce(self._prefix, _EXTRA, 2), data, self._aad)

    def opener(self) -> Opener:
        """The reader of what this sealer writes (no unwrapping needed)."""
        return Opener(self._aead, self._aad, self._prefix)

    def _seal(self, data, last: int) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._counter, last), data, self._aad)
        self._counter += 1
        return sealed


class Opener:
    """Reads a sealed message back: `open_header` unwraps its data key."""

    __slots__ = ("_aead", "_aad", "_prefix")

    def __init__(self, aead: AESGCM, aad: bytes, prefix: bytes):
        self._aead = aead
        self._aad = aad
        self._prefix = prefix

    @classmethod
    def open_header(cls, keyring: Keyring, header: bytes, queue_id: str) -> Opener:
        """Raises DecryptionError for a header that is not ours, a key the keyring
        lacks, or a wrapped key that does not authenticate."""
        if len(header) < HEADER_SIZE or not is_sealed(header):
            raise DecryptionError(f"queue file {queue_id}: not an encrypted queued message")
        at = len(MAGIC) + 1
        key_id = header[at : at + ID_SIZE].hex()
        at += ID_SIZE
        wrap_nonce = header[at : at + _WRAP_NONCE]
        wrapped = header[at + _WRAP_NONCE : at + _WRAP_NONCE + _WRAPPED]
        prefix = header[HEADER_SIZE - _PREFIX : HEADER_SIZE]
        if key_id not in keyring.keys:
            raise DecryptionError(
                f"queue file {queue_id}: wrong master key for key id {key_id}:"
                " no such key in the keyring"
            )
        head = header[: len(MAGIC) + 1 + ID_SIZE]
        try:
            data_key = keyring.kek(key_id).decrypt(wrap_nonce, wrapped, head)
        except InvalidTag:
            raise DecryptionError(
                f"queue file {queue_id}: wrong master key for key id {key_id}"
                " (or its wrapped data key was altered)"
            ) from None
        return cls(AESGCM(data_key), bytes(header[:HEADER_SIZE]) + queue_id.encode("ascii"), prefix)

    def open_extra(self, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(_nonce(self._prefix, _EXTRA, 2), sealed, self._aad)
        except InvalidTag:
            raise DecryptionError("queued message's sealed metadata was altered") from None

    def segments(
        self, read: Callable[[int, int], bytes], clear_length: int, limit: int | None = None
    ) -> Iterator[bytes]:
        """The clear bytes of a stored message, one segment at a time; `read(offset,
        size)` reads the stored body.  Stops once `limit` clear bytes were given."""
        count = clear_length // SEGMENT + 1
        offset = HEADER_SIZE
        done = 0
        for i in range(count):
            last = i == count - 1
            size = (clear_length - i * SEGMENT if last else SEGMENT) + TAG
            sealed = read(offset, size)
            if len(sealed) != size:
                raise DecryptionError("queued message is shorter than recorded")
            try:
                clear = self._aead.decrypt(_nonce(self._prefix, i, int(last)), sealed, self._aad)
            except InvalidTag:
                raise DecryptionError(
                    f"queued message was altered (segment {i} does not authenticate)"
                ) from None
            offset += size
            done += len(clear)
            yield clear
            if limit is not None and done >= limit:
                return
