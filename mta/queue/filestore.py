"""`FileQueueStore`: the `IQueueStore` of one spool directory, and its schedule.

The spool (`mta.queue.spool`) makes messages durable; this class decides which of
them is due, Postfix's queue manager in miniature.  Fresh commits come first (they
arrive through the spool's ``on_commit`` hook, so steady state needs no directory
polling); entries found on disk at startup and entries whose retry time has come
follow.  Memory stays bounded under a large backlog: only fresh entries (up to
`window`) are held whole, and only those claimed the moment they arrive keep their
body in memory; a deferred or recovered entry is remembered as ``(due, qid)`` and
read back from disk when it is claimed.  One timer on the injected clock covers the
whole deferred heap.

An entry handed out by `claim` is leased to the caller until `defer`, `finish` or
`bury` returns it.  Operator actions (`hold`, `delete`) first withdraw the entry
from the schedule and wait for its lease to end, so the files are never moved under
a delivery; `release` and `requeue` put it back.  One process owns a spool, so a
lease here never expires: the process that holds it is the one that runs.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mta.interfaces import IQueueStore
from mta.observe.logging import Logger
from mta.queue import files
from mta.queue.entry import QueueEntry
from mta.queue.ids import is_queue_id
from mta.queue.layout import ACTIVE, HOLD
from mta.queue.spool import Spool

log = Logger()

LOAD_RETRY = 60.0


class NotQueued(LookupError):
    """An operator action on an entry that is not where the action needs it."""


@implementer(IQueueStore)
class FileQueueStore:
    """The file spool in `queue_dir` plus its schedule; see the module docstring."""

    def __init__(
        self,
        queue_dir: str,
        reactor,
        threadpool,
        *,
        window: int = 10000,
        **spool_options,
    ):
        self.spool = Spool(queue_dir, reactor, threadpool, **spool_options)
        self.spool.on_commit = self._arrived
        self.queue_dir = queue_dir
        self.reactor = reactor
        self._pool = threadpool
        self.window = window
        self.on_ready: Callable[[], None] | None = None
        self._fresh: deque[QueueEntry] = deque()
        self._due: deque[tuple[str, bool]] = deque()
        self._waiting: list[tuple[float, int, str, bool]] = []
        self._seq = itertools.count()
        self._timer = None
        self._leased: set[str] = set()
        self._loading: dict[str, int] = {}
        self._withdrawn: set[str] = set()
        self._settle: dict[str, list[Deferred]] = {}
        self._stopped = False

    # -- ISpool: the receiving side ------------------------------------------------

    def new_queue_id(self) -> str:
        return self.spool.new_queue_id()

    def open(self, queue_id: str):
        return self.spool.open(queue_id)

    def backlog(self) -> int:
        return self.spool.backlog()

    @property
    def commit_batches(self) -> int:
        return self.spool.commit_batches

    # -- intake --------------------------------------------------------------------

    def _arrived(self, entry: QueueEntry) -> None:
        """A fresh commit (the spool's on_commit hook)."""
        if len(self._fresh) < self.window:
            self._fresh.append(entry)
        else:
            entry.body.forget_memory()
            self._due.append((entry.qid, False))
        self._ready()
        if self._fresh and self._fresh[-1] is entry:
            entry.body.forget_memory()  # not claimed at once: it waits, reading the file

    def _ready(self) -> None:
        if self.on_ready is not None and not self._stopped:
            self.on_ready()

    def recover(self) -> Deferred:
        self._stopped = False
        d = self.spool.recover()

        def found(entries: list[tuple[float, str]]) -> int:
            now = self.reactor.seconds()
            for due, qid in entries:
                if due <= now:
                    self._due.append((qid, True))
                else:
                    heapq.heappush(self._waiting, (due, next(self._seq), qid, True))
            log.info("recovered {count} queued message(s)", count=len(entries), event="recovered")
            self._arm()
            self._ready()
            return len(entries)

        return d.addCallback(found)

    # -- claims and leases -----------------------------------------------------------

    def claim(self, limit: int) -> Deferred:
        out: list[QueueEntry] = []
        fresh = self._fresh
        while fresh and len(out) < limit:
            entry = fresh.popleft()
            self._leased.add(entry.qid)
            out.append(entry)
        if len(out) >= limit or not self._due:
            return succeed(out)
        loads = []
        while self._due and len(out) + len(loads) < limit:
            qid, recovered = self._due.popleft()
            self._loading[qid] = self._loading.get(qid, 0) + 1
            d = self.spool.load(qid)
            d.addCallbacks(self._loaded, self._load_failed, (qid, recovered), None, (qid,))
            loads.append(d)
        d = gatherResults(loads)
        d.addCallback(lambda loaded: out + [e for e in loaded if e is not None])
        return d

    def _loaded(self, entry: QueueEntry | None, qid: str, recovered: bool):
        self._end_loading(qid)
        if qid in self._withdrawn:
            self._settled(qid)
            return None
        if entry is None:
            log.info("{qid} left the queue before its attempt", qid=qid, event="gone")
            return None
        if self._stopped:
            return None  # still on disk; the next start recovers it
        entry.recovered = recovered
        self._leased.add(qid)
        return entry

    def _load_failed(self, f, qid: str):
        self._end_loading(qid)
        if qid in self._withdrawn:
            self._settled(qid)
            return None
        log.failure("cannot load {qid}; retrying later", failure=f, qid=qid, event="load_failed")
        self._wait(qid, self.reactor.seconds() + LOAD_RETRY, False)
        return None

    def _end_loading(self, qid: str) -> None:
        n = self._loading.get(qid, 0) - 1
        if n > 0:
            self._loading[qid] = n
        else:
            self._loading.pop(qid, None)

    def _return(self, qid: str) -> None:
        self._leased.discard(qid)
        if qid in self._withdrawn:
            self._settled(qid)

    def defer(self, entry: QueueEntry, next_attempt: float) -> Deferred:
        entry.body.forget_memory()
        d = self.spool.record(entry)
        if entry.qid not in self._withdrawn:
            self._wait(entry.qid, next_attempt, False)
        d.addBoth(self._returned, entry.qid)
        return d

    def finish(self, entry: QueueEntry) -> Deferred:
        return self.spool.finish(entry).addBoth(self._returned, entry.qid)

    def bury(self, entry: QueueEntry, reason: str) -> Deferred:
        return self.spool.bury(entry, reason).addBoth(self._returned, entry.qid)

    def _returned(self, result, qid: str):
        self._return(qid)
        return result

    # -- the deferred heap ------------------------------------------------------------

    def _wait(self, qid: str, due: float, recovered: bool) -> None:
        heapq.heappush(self._waiting, (due, next(self._seq), qid, recovered))
        self._arm()

    def _arm(self) -> None:
        if not self._waiting or self._stopped:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        due = self._waiting[0][0]
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= due:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, due - self.reactor.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        while self._waiting and self._waiting[0][0] <= now:
            _, _, qid, recovered = heapq.heappop(self._waiting)
            self._due.append((qid, recovered))
        self._arm()
        self._ready()

    def depth(self) -> dict[str, int]:
        return {
            "incoming": len(self._fresh),
            "active": len(self._leased) + sum(self._loading.values()),
            "ready": len(self._due),
            "deferred": len(self._waiting),
        }

    def stop(self) -> None:
        """Stop scheduling (the runner is stopping): no timer, no more claims."""
        self._stopped = True
        self._arm()

    def wait_idle(self) -> Deferred:
        return self.spool.wait_idle()

    def probe(self) -> str:
        """Blocking readiness probe: the spool takes a new file and a rename."""
        from mta.observe.health import probe_directory_writable

        return probe_directory_writable(self.spool.tmp_dir, rename_into=self.spool.active_dir)

    # -- operator actions (mta.queue.control executes them in the owner) -----------------

    def flush(self) -> int:
        """Make every deferred entry due now; how many there were."""
        count = len(self._waiting)
        while self._waiting:
            _, _, qid, recovered = heapq.heappop(self._waiting)
            self._due.append((qid, recovered))
        self._arm()
        self._ready()
        return count

    def retry(self, qid: str) -> str:
        """Make a deferred `qid` due now: "scheduled", "busy" (being tried or already
        due) or "unknown"."""
        if any(item[2] == qid for item in self._waiting):
            self._unschedule(qid)
            self._due.append((qid, False))
            self._ready()
            return "scheduled"
        if (
            qid in self._leased
            or qid in self._loading
            or any(q == qid for q, _ in self._due)
            or any(e.qid == qid for e in self._fresh)
        ):
            return "busy"
        return "unknown"

    async def hold(self, qid: str) -> None:
        """Move an active entry to ``hold/``, once no attempt of it runs."""

        def hold() -> str | None:
            return ACTIVE if files.move_entry(self.queue_dir, qid, ACTIVE, HOLD) else None

        await self._withdraw_and(qid, hold, f"{qid} is not in the active queue")

    async def delete(self, qid: str) -> str:
        """Delete an entry wherever it is; the place it was in."""
        return await self._withdraw_and(
            qid,
            lambda: files.delete_entry(self.queue_dir, qid),
            f"{qid}: no such message in the queue",
        )

    async def _withdraw_and(self, qid: str, operation, missing: str) -> str:
        """Withdraw `qid`, then run `operation` (blocking; the place the entry left,
        or None when it was not there: NotQueued(`missing`))."""
        if not is_queue_id(qid):
            raise NotQueued(f"{qid!r} is not a queue id")
        await self._withdraw(qid)
        try:
            place = await deferToThreadPool(self.reactor, self._pool, operation)
        except Exception:
            self._readmit(qid)  # still in active/: keep delivering it
            raise
        self._withdrawn.discard(qid)
        if place is None:
            raise NotQueued(missing)
        if place == ACTIVE:
            self.spool.adjust_backlog(-1)
        return place

    async def release(self, qid: str) -> None:
        """Move a held entry back to ``active/`` and schedule it now."""
        moved = await deferToThreadPool(
            self.reactor, self._pool, files.move_entry, self.queue_dir, qid, "hold", "active"
        )
        if not moved:
            raise NotQueued(f"{qid} is not on hold")
        self.spool.adjust_backlog(1)
        self._readmit(qid)

    async def requeue(self, qid: str) -> None:
        """Move a dead letter back to ``active/``, failed recipients pending again."""
        moved = await deferToThreadPool(
            self.reactor,
            self._pool,
            files.requeue_entry,
            self.queue_dir,
            qid,
            self.reactor.seconds(),
        )
        if not moved:
            raise NotQueued(f"{qid} is not a dead letter")
        self.spool.adjust_backlog(1)
        self._readmit(qid)

    def _withdraw(self, qid: str) -> Deferred:
        """Take `qid` out of the schedule; fires once no attempt or load of it is in
        flight.  Until `_readmit` it is never handed out again."""
        self._withdrawn.add(qid)
        self._unschedule(qid)
        d: Deferred = Deferred()
        if qid in self._leased or qid in self._loading:
            self._settle.setdefault(qid, []).append(d)
        else:
            d.callback(None)
        return d

    def _readmit(self, qid: str) -> None:
        self._withdrawn.discard(qid)
        self._due.append((qid, True))
        self._ready()

    def _unschedule(self, qid: str) -> None:
        if any(e.qid == qid for e in self._fresh):
            self._fresh = deque(e for e in self._fresh if e.qid != qid)
        if any(q == qid for q, _ in self._due):
            self._due = deque(item for item in self._due if item[0] != qid)
        if any(item[2] == qid for item in self._waiting):
            self._waiting = [item for item in self._waiting if item[2] != qid]
            heapq.heapify(self._waiting)
            self._arm()

    def _settled(self, qid: str) -> None:
        self._unschedule(qid)
        if qid in self._leased or qid in self._loading:
            return
        for d in self._settle.pop(qid, []):
            d.callback(None)
