"""Blocking helpers for durable file work, shared by the spool and the mail stores.

They run on thread pools, never on the reactor.  `fsync` is a parameter so tests can
count calls or make them fail.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator


def regroup(pieces: Iterable[bytes], size: int) -> Iterator[bytes]:
    """`pieces` regrouped into chunks of exactly `size` bytes (the last may be
    shorter), holding at most one chunk plus one piece: S3 parts, PostgreSQL body
    chunks."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def write_all(fd: int, buffers: list) -> int:
    """Write every buffer with as few writev calls as the kernel allows; returns
    the number of bytes written."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    while views:
        n = os.writev(fd, views[:1024])
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total


def fsync_dir(path: str, fsync: Callable[[int], None] = os.fsync) -> None:
    """Make the entries of directory `path` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(
    directory: str, fsync: Callable[[int], None] = os.fsync, subdirs: tuple[str, ...] = ()
) -> None:
    """Create `directory` (with its missing parents, and `subdirs` inside it), mode
    0700, and fsync every directory made and the one each was made in: a message
    written and fsynced under it must not vanish with its path after a crash."""
    created = []
    path = directory
    while not os.path.isdir(path):
        created.append(path)
        path = os.path.dirname(path)
    for sub in subdirs or ("",):
        os.makedirs(os.path.join(directory, sub), mode=0o700, exist_ok=True)
    if created or subdirs:
        for d in dict.fromkeys([directory, *created, path]):
            fsync_dir(d, fsync)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (a leftover's owner may still be writing it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def probe_writable(directory: str) -> str:
    """Readiness of a file-based store: `directory` (made if missing) takes a new
    file, written and removed.  Raises OSError saying why not."""
    os.makedirs(directory, mode=0o750, exist_ok=True)
    path = f"{directory}/.probe-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        write_all(fd, [b"probe\n"])
    finally:
        os.close(fd)
        os.unlink(path)
    return "writable"
