"""Removing header fields from a message still being received (`SpoolFile.remove_headers`).

A message in memory (the common case, under 256 KB) is edited in place on the
reactor: one join and one scan of at most that much.  A message that spilled to
``queue/tmp/<qid>`` is rewritten on the spool's thread: its edited header section and
then the rest of the old file (`os.copy_file_range`, no copy through Python) go to a
new file that is renamed over the old one, so at every moment ``tmp/<qid>`` is one
whole message.  Only called when a check saw a field to remove.
"""

from __future__ import annotations

import os

from mta.fileio import write_all
from mta.headers import header_end, remove_fields

# The most of a spilled message read to find its header section: a message whose
# header section is longer keeps the fields past this point.
HEAD_LIMIT = 1024 * 1024
_COPY = 1024 * 1024
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def edit_chunks(chunks: list[bytes], matches) -> tuple[list[bytes], int, int]:
    """(new chunks, fields removed, bytes removed) for a message held in memory."""
    data = b"".join(chunks)
    end = header_end(data)
    head = data if end is None else data[:end]
    new_head, removed = remove_fields(head, matches)
    if not removed:
        return chunks, 0, 0
    return [new_head, data[len(head) :]], removed, len(head) - len(new_head)


def edit_file(path: str, fd: int, length: int, matches) -> tuple[int, int, int]:
    """Thread: rewrite the spilled message at `path` (open as `fd`, `length` bytes)
    without the matching fields.  Returns (fd of the message now at `path`, fields
    removed, its new length); the caller closes `fd` when a new one came back."""
    rfd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        data = os.pread(rfd, min(length, HEAD_LIMIT), 0)
        end = header_end(data)
        if end is None:
            cut = data.rfind(b"\n") + 1  # an unended header section: whole lines only
            end = cut if len(data) < length else len(data)
        new_head, removed = remove_fields(data[:end], matches)
        if not removed:
            return fd, 0, length
        tmp = path + ".edit"
        nfd = os.open(tmp, _NEW_FLAGS, 0o600)
        try:
            write_all(nfd, [new_head])
            _copy_range(rfd, end, nfd, len(new_head), length - end)
            os.rename(tmp, path)
        except BaseException:
            os.close(nfd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        os.lseek(nfd, 0, os.SEEK_END)  # the commit appends the metadata trailer here
        return nfd, removed, length - (end - len(new_head))
    finally:
        os.close(rfd)


def _copy_range(src: int, src_off: int, dst: int, dst_off: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, min(count, _COPY), src_off, dst_off)
        except OSError:
            n = 0
        if n <= 0:  # not supported here, or a short file: copy through memory
            data = os.pread(src, min(count, _COPY), src_off)
            if not data:
                raise OSError(f"spooled message shorter than {count} more bytes")
            n = os.pwrite(dst, data, dst_off)
        src_off += n
        dst_off += n
        count -= n
