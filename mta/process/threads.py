"""A lean stand-in for Twisted's ThreadPool, for the per-message file work.

The spool's group commits and the Maildir deliveries hop to a thread and back for
every batch, a few times per message.  `twisted.python.threadpool.ThreadPool` makes
each hop expensive in Python: a call goes through its `Team` coordinator (a
`LockWorker` with its own lock), a `queue.Queue` built on a Python `Condition`, and
captures and re-enters the logging context; profiles of the 20-connection benchmark
put that machinery at several percent of the reactor's time.  `WorkThreads` keeps
the part of the interface `deferToThreadPool` uses (`callInThreadWithCallback`) plus
`start`/`stop`, and hands calls to a fixed set of threads through a C-implemented
`queue.SimpleQueue`.  Everything else (Argon2id, SQLite, DKIM) stays on ThreadPool.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from twisted.application.service import Service
from twisted.python.failure import Failure

from mta.observe.logging import Logger

log = Logger()
_STOP = object()


class WorkThreads:
    """`size` threads named `name`-N taking calls in arrival order."""

    def __init__(self, name: str, size: int):
        self.name = name
        self.size = max(1, size)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Let the calls already queued finish, then end every thread."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._calls.put(_STOP)
        for t in threads:
            t.join()

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, object], None], func: Callable, *args, **kwargs
    ) -> None:
        """Run `func(*args, **kwargs)` on a thread, then `onResult(True, result)` or
        `onResult(False, Failure)` on that same thread (as ThreadPool does)."""
        self._calls.put((onResult, func, args, kwargs))

    def callInThread(self, func: Callable, *args, **kwargs) -> None:
        self._calls.put((None, func, args, kwargs))

    def _work(self) -> None:
        get = self._calls.get
        while True:
            call = get()
            if call is _STOP:
                return
            on_result, func, args, kwargs = call
            try:
                result = func(*args, **kwargs)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            del func, args, kwargs, call
            try:
                if on_result is not None:
                    on_result(ok, result)
                elif not ok:
                    log.failure("unhandled error in {thread}", result, thread=self.name)
            except BaseException:
                log.failure("unhandled error in a result callback on {thread}", thread=self.name)
            del on_result, result


class ThreadPoolService(Service):
    """Starts and stops a thread pool (`ThreadPool` or `WorkThreads`) with the
    service tree; added before its users, so it stops after them."""

    def __init__(self, pool):
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()
