"""`FileBody`: the `IMessageBody` of a message in the file spool.

A queued message is its trace headers (kept in the queue file's metadata) followed by
the first `length` bytes of the queue file.  Right after a commit a small message is
still in memory, and reading it back from the file would cost a thread hop's worth of
system calls per copy: the body then also holds the chunks, and the queue drops them
(`forget_memory`) once the first attempt is over.  Nothing outside `mta.queue` knows
any of this: delivery, bounces and DKIM read through the interface.

With ``[queue] encrypt`` the file holds the body sealed segment by segment
(`mta.crypto.stream`): the body then has an `opener` and every read decrypts (and
authenticates) one segment at a time, so memory stays bounded and no clear copy is
ever written; the fast kernel copy is for clear files only.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

from zope.interface import implementer

from mta.fileio import write_all
from mta.interfaces import IMessageBody

_SMALL = 256 * 1024
_COPY_CHUNK = 1024 * 1024
_O_RDONLY = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


class ShortMessage(OSError):
    """The stored message is shorter than its recorded length (a damaged file)."""

    def __init__(self, where: str):
        super().__init__(errno.EIO, f"{where}: queued message is shorter than recorded")


@implementer(IMessageBody)
class FileBody:
    """`prefix` (trace headers) then bytes [0, length) of `path`, or of `memory`."""

    __slots__ = ("prefix", "_path", "length", "_memory", "_opener")

    def __init__(
        self,
        prefix: bytes,
        path: str | None,
        length: int,
        memory: Sequence[bytes] | None = None,
        opener=None,
    ):
        self.prefix = prefix
        self._path = path
        self.length = length
        self._memory = memory
        self._opener = opener  # mta.crypto.stream.Opener of a sealed file

    @property
    def size(self) -> int:
        return len(self.prefix) + self.length

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def forget_memory(self) -> None:
        """Read the file from now on (the queue calls this; memory stays bounded)."""
        if self._path is not None:
            self._memory = None

    # -- IMessageBody -------------------------------------------------------------

    def header_block(self, limit: int = 65536) -> bytes:
        head = self.prefix
        if len(head) < limit and self.length:
            want = min(self.length, limit - len(head))
            if self._memory is not None:
                data = b"".join(self._memory)[:want]
            elif self._opener is not None:
                data = b"".join(self._sealed(want))[:want]
            else:
                fd = os.open(self._path, _O_RDONLY)
                try:
                    data = os.pread(fd, want, 0)
                finally:
                    os.close(fd)
            head += data
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
        if self._memory is not None:
            yield from (c for c in self._memory if c)
            return
        if self._opener is not None:
            yield from self._sealed()
            return
        left = self.length
        if not left:
            return
        with open(self._path, "rb", buffering=0) as f:
            while left > 0:
                data = f.read(min(chunk_size, left))
                if not data:
                    raise ShortMessage(self._path)
                left -= len(data)
                yield data

    def copy_into(self, fd: int, prefix: bytes = b"") -> int:
        if self._memory is not None:
            written = write_all(fd, [prefix, self.prefix, *self._memory])
            if written != len(prefix) + self.size:
                raise ShortMessage("message held in memory")
            return written
        if self._opener is not None:
            write_all(fd, [prefix, self.prefix])
            for clear in self._sealed():
                write_all(fd, [clear])
            return len(prefix) + self.size
        src = os.open(self._path, _O_RDONLY)
        try:
            _copy(fd, src, prefix + self.prefix, self.length, self._path)
        finally:
            os.close(src)
        return len(prefix) + self.size

    def _sealed(self, limit: int | None = None) -> Iterator[bytes]:
        """The clear body of a sealed file, a segment at a time."""
        src = os.open(self._path, _O_RDONLY)
        try:
            for clear in self._opener.segments(
                lambda offset, size: os.pread(src, size, offset), self.length, limit
            ):
                if clear:
                    yield clear
        finally:
            os.close(src)


def _copy(dst: int, src: int, prefix: bytes, length: int, where: str) -> None:
    """Write `prefix` then bytes [0, length) of `src` into `dst`, in bounded memory
    (copy_file_range or sendfile for big bodies, one pread + writev for small ones)."""
    if length <= _SMALL:
        data = os.pread(src, length, 0)
        if len(data) != length:
            raise ShortMessage(where)
        write_all(dst, [prefix, data])
        return
    write_all(dst, [prefix])
    offset = 0
    fast = True
    while offset < length:
        count = min(_COPY_CHUNK * 8, length - offset)
        n = 0
        if fast:
            try:
                if hasattr(os, "copy_file_range"):
                    n = os.copy_file_range(src, dst, count, offset)
                else:
                    n = os.sendfile(dst, src, offset, count)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                fast = False
                continue
        else:
            data = os.pread(src, min(_COPY_CHUNK, count), offset)
            n = len(data)
            if n:
                write_all(dst, [data])
        if n == 0:
            raise ShortMessage(where)
        offset += n
