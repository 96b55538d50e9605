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
and the authenticated data ``magic | version | nonce prefix | queue id``; every segment but the last holds
exactly SEGMENT bytes, the last fewer (possibly none) and is flagged last.  So the
stored size follows from the message size (`stored_length`), a truncated,
reordered or extended file fails to authenticate, and a body copied into another
queue file (another queue id) does too.  Small values that belong to the message but
live elsewhere (the trace headers, kept in the queue file's metadata) are sealed
with the same key under a counter no segment uses (`seal_extra`).

The data key is wrapped like the stores' data keys, under the key-encryption key of
the keyring's current master key (`mta.crypto.keys`), so `mta-admin key rotate`
applies to the spool too; a queued message keeps the key it was written under.  The
key id and wrapped key are not in the segments' authenticated data, so `rewrap`
moves a sealed file to another master key by rewriting its header alone.
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


def _aad(prefix: bytes, queue_id: str) -> bytes:
    return MAGIC + bytes([VERSION]) + prefix + queue_id.encode("ascii")


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
        self._aad = _aad(prefix, queue_id)
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


def header_key_id(header: bytes) -> str | None:
    """The master key id a sealed file's header names, None if not a sealed file."""
    if len(header) < HEADER_SIZE or not is_sealed(header):
        return None
    return header[len(MAGIC) + 1 : len(MAGIC) + 1 + ID_SIZE].hex()


def rewrap(keyring: Keyring, header: bytes, name: str) -> bytes:
    """`header` with its data key wrapped under the keyring's current key instead
    (the segments stay as they are)."""
    key_id = header_key_id(header)
    if key_id is None:
        raise DecryptionError(f"{name}: not a sealed file")
    data_key = _unwrap(keyring, header, key_id, name)
    new_id = keyring.current
    head = MAGIC + bytes([VERSION]) + bytes.fromhex(new_id)
    wrap_nonce = os.urandom(_WRAP_NONCE)
    wrapped = keyring.kek(new_id).encrypt(wrap_nonce, data_key, head)
    return head + wrap_nonce + wrapped + header[HEADER_SIZE - _PREFIX : HEADER_SIZE]


def _unwrap(keyring: Keyring, header: bytes, key_id: str, name: str) -> bytes:
    at = len(MAGIC) + 1 + ID_SIZE
    wrap_nonce = header[at : at + _WRAP_NONCE]
    wrapped = header[at + _WRAP_NONCE : at + _WRAP_NONCE + _WRAPPED]
    if key_id not in keyring.keys:
        raise DecryptionError(
            f"{name}: wrong master key for key id {key_id}: no such key in the keyring"
        )
    try:
        return keyring.kek(key_id).decrypt(wrap_nonce, wrapped, header[:at])
    except InvalidTag:
        raise DecryptionError(
            f"{name}: wrong master key for key id {key_id} (or its wrapped data key was altered)"
        ) from None


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
        key_id = header_key_id(header)
        if key_id is None:
            raise DecryptionError(f"queue file {queue_id}: not an encrypted queued message")
        data_key = _unwrap(keyring, header, key_id, f"queue file {queue_id}")
        prefix = header[HEADER_SIZE - _PREFIX : HEADER_SIZE]
        return cls(AESGCM(data_key), _aad(prefix, queue_id), prefix)

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


def seal_stream(sealer: Sealer, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Header, segments and last segment of `chunks`, produced as they are read."""
    yield sealer.header
    for chunk in chunks:
        yield from sealer.feed((chunk,))
    yield sealer.close()


def read_sealed_file(keyring: Keyring, path: str, name: str, clear_length: int) -> bytes:
    """The clear content of a whole sealed file `path` sealed under `name` (blocking;
    for files an operator reads whole, such as a quarantined message)."""
    with open(path, "rb") as f:
        opener = Opener.open_header(keyring, f.read(HEADER_SIZE), name)

        def read(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        return b"".join(opener.segments(read, clear_length))


def rewrap_file(keyring: Keyring, path: str, key_id: str) -> bool:
    """Re-wrap the sealed file `path` under the current key if it is sealed under
    `key_id` (a copy with the new header, fsynced, renamed over it: a crash leaves
    the old file or the new one); whether it was.  Mode and times are kept."""
    with open(path, "rb") as src:
        header = src.read(HEADER_SIZE)
        if header_key_id(header) != key_id:
            return False
        new = rewrap(keyring, header, path)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.rewrap")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        st = os.fstat(src.fileno())
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
            dst.write(new)
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    os.chmod(tmp, st.st_mode & 0o7777)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
