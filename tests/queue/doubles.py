"""Test doubles for the queue, storage and delivery tests: a clock that can take
results "from a thread", and thread pools that run jobs inline or on demand."""

from __future__ import annotations

import os
import stat

from twisted.internet import task
from twisted.python.failure import Failure

from mta.envelope import Address, Envelope


class ThreadClock(task.Clock):
    """task.Clock plus callFromThread (all our "threads" run on the test's thread)."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class InlinePool:
    """A ThreadPool double that runs each job immediately."""

    def __init__(self):
        self.jobs = 0

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs += 1
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class ManualPool:
    """A ThreadPool double that holds jobs until the test runs them."""

    def __init__(self):
        self.queue = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.queue.append((on_result, f, args, kwargs))

    def run_one(self):
        on_result, f, args, kwargs = self.queue.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)

    def run_all(self):
        while self.queue:
            self.run_one()


class FsyncCounter:
    """An fsync that counts file and directory syncs."""

    def __init__(self):
        self.files = 0
        self.dirs = 0

    def __call__(self, fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            self.dirs += 1
        else:
            self.files += 1
        os.fsync(fd)


def envelope(*rcpts: str, sender: str = "sender@remote.test", received_at: float = 0.0) -> Envelope:
    def addr(s):
        local, _, domain = s.rpartition("@")
        return Address(local, domain)

    return Envelope(
        sender=addr(sender) if sender else Address("", ""),
        recipients=tuple(addr(r) for r in rcpts),
        helo="client.remote.test",
        client_address="192.0.2.7",
        listener="smtp",
        received_at=received_at,
    )
