"""`BatchWorker`: group commit for any blocking per-item work.

Items submitted while every lane is busy form the next batch, so a busy server pays
one thread hop (and one directory fsync, for the spool and the Maildir store) per
batch instead of per item.  Several lanes let the kernel merge concurrent fsyncs
into one journal commit, which is worth several times the throughput of sequential
fsyncs on ext4.  The spool's writes and local delivery both run on it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

MAX_BATCH = 1024


class BatchWorker:
    """Runs `process(items)` in `pool`, at most `lanes` batches at a time.

    `process` returns one ``(ok, value)`` per item: each submitted Deferred fires
    with `value`, or fails with it when `ok` is false.  `weight(item)` (default 1)
    counts toward `max_batch`, so an item that stands for many (a message with many
    recipients) is not split across batches.
    """

    def __init__(
        self,
        reactor,
        pool,
        process: Callable[[list], list],
        lanes: int = 1,
        max_batch: int = MAX_BATCH,
        weight: Callable[[object], int] | None = None,
    ):
        self._reactor = reactor
        self._pool = pool
        self._process = process
        self._lanes = max(1, lanes)
        self._max_batch = max_batch
        self._weight = weight
        self._pending: list[tuple[object, Deferred]] = []
        self._running = 0
        self._firing = 0
        self._idle: list[Deferred] = []
        self.batches = 0

    def submit(self, item) -> Deferred:
        d: Deferred = Deferred()
        self._pending.append((item, d))
        self._fill()
        return d

    def wait_idle(self) -> Deferred:
        if not self._running and not self._pending:
            return succeed(None)
        d: Deferred = Deferred()
        self._idle.append(d)
        return d

    def _take(self) -> list[tuple[object, Deferred]]:
        if self._weight is None:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            return batch
        count = 0
        n = 0
        for item, _ in self._pending:
            w = self._weight(item)
            if n and count + w > self._max_batch:
                break
            count += w
            n += 1
        batch = self._pending[:n]
        del self._pending[:n]
        return batch

    def _fill(self) -> None:
        # Not while results are being delivered: what callbacks submit joins one batch.
        while self._pending and not self._firing and self._running < self._lanes:
            batch = self._take()
            self._running += 1
            self.batches += 1
            items = [item for item, _ in batch]
            d = deferToThreadPool(self._reactor, self._pool, self._process, items)
            d.addBoth(self._finished, batch)

    def _finished(self, outcome, batch) -> None:
        self._firing += 1
        try:
            for i, (_, d) in enumerate(batch):
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    ok, value = outcome[i]
                    if ok:
                        d.callback(value)
                    else:
                        d.errback(Failure(value))
        finally:
            self._firing -= 1
            self._running -= 1
        self._fill()
        if not self._running and not self._pending and self._idle:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)
