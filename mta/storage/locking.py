"""Locking a mailbox file the way mail readers do (mutt, procmail, Dovecot's mbox).

`MailboxLock(path)` holds, in this order: a per-path `threading.Lock` (POSIX record
locks do not exclude threads of one process), the dotlock ``<path>.lock`` created
with ``O_CREAT|O_EXCL`` and holding our pid, and an exclusive ``fcntl.lockf`` on the
file itself.  A dotlock is stale when the pid written in it is not alive on this
host or when it is older than `stale_after` seconds; a stale one is removed.  When
the lock cannot be had within `timeout` seconds, `MailboxBusy` (an OSError) says so.
Everything here blocks; callers run on a thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

from mta.fileio import pid_alive

__all__ = ["MailboxBusy", "MailboxLock"]

_O_LOCK = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_FILE = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_threads: dict[str, threading.Lock] = {}
_threads_guard = threading.Lock()


class MailboxBusy(OSError):
    """Someone else holds the mailbox lock for longer than we wait."""

    def __init__(self, path: str):
        super().__init__(errno.EAGAIN, "mailbox is locked by another program", path)


def _thread_lock(path: str) -> threading.Lock:
    with _threads_guard:
        lock = _threads.get(path)
        if lock is None:
            lock = _threads[path] = threading.Lock()
        return lock


class MailboxLock:
    """A context manager: ``with MailboxLock(path) as fd`` gives the mailbox file
    open read-write (created when missing, mode 0600), locked every way."""

    def __init__(
        self,
        path: str,
        *,
        timeout: float = 30.0,
        stale_after: float = 300.0,
        create: bool = True,
    ):
        self.path = path
        self.dotlock = path + ".lock"
        self.timeout = timeout
        self.stale_after = stale_after
        self.create = create
        self.fd: int | None = None
        self._thread = _thread_lock(path)
        self._dotlocked = False

    def __enter__(self) -> int:
        deadline = time.monotonic() + self.timeout
        if not self._thread.acquire(timeout=max(self.timeout, 0.001)):
            raise MailboxBusy(self.path)
        try:
            self._take_dotlock(deadline)
            flags = _O_FILE if self.create else _O_FILE & ~os.O_CREAT
            self.fd = os.open(self.path, flags, 0o600)
            while True:
                try:
                    fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise MailboxBusy(self.path)
                time.sleep(0.05)
        except BaseException:
            self._release()
            raise
        return self.fd

    def __exit__(self, *exc) -> None:
        self._release()

    def _take_dotlock(self, deadline: float) -> None:
        while True:
            try:
                fd = os.open(self.dotlock, _O_LOCK, 0o600)
            except FileExistsError:
                if self._remove_if_stale():
                    continue
                if time.monotonic() >= deadline:
                    raise MailboxBusy(self.path) from None
                time.sleep(0.05)
                continue
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            self._dotlocked = True
            return

    def _remove_if_stale(self) -> bool:
        try:
            with open(self.dotlock, "rb") as f:
                text = f.read(32)
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return True  # gone meanwhile: try again
        try:
            pid = int(text.split()[0]) if text.strip() else 0
        except ValueError:
            pid = 0
        if age < self.stale_after and (pid <= 0 or pid_alive(pid)):
            return False
        try:
            os.unlink(self.dotlock)
        except FileNotFoundError:
            pass
        return True

    def _release(self) -> None:
        try:
            if self.fd is not None:
                os.close(self.fd)  # also drops the lockf lock
                self.fd = None
            if self._dotlocked:
                self._dotlocked = False
                try:
                    os.unlink(self.dotlock)
                except FileNotFoundError:
                    pass
        finally:
            self._thread.release()
