"""The queue runner: decides when each queued message is (re)tried, and records it.

Postfix's queue manager in miniature.  Fresh commits arrive through the spool's
``on_commit`` hook and go first; entries found on disk at startup, and entries
whose retry time has come, follow.  At most `concurrency` attempts are in flight.

Memory stays bounded under a large backlog: only fresh entries (up to `window`) are
held whole; a deferred or recovered entry is remembered as ``(due, qid)`` and read
back from disk when its turn comes.  One timer (``reactor.callLater`` on the
injected clock) covers the whole deferred heap.

After each attempt: all recipients finished -> the file is deleted (or moved to
``queue/dead/`` when some failed permanently and no bounce could be queued: see
`mta.queue.bounce`; a null sender is never bounced); otherwise the
per-recipient status is persisted and the next attempt scheduled by
`mta.queue.backoff.next_delay`, never later than `created + max_age`, when the
remaining recipients fail permanently.  One log event per state change, keyed by qid.

Delivery status notifications follow the sender's DSN request (RFC 3461, see
`mta.queue.bounce`): recipients delivered by an attempt that asked for
NOTIFY=SUCCESS are reported right after it; a recipient still deferred once the
entry is `delay_warning` seconds old and that asked for NOTIFY=DELAY explicitly
gets one delay notice; failures are reported when the entry is finished, unless
every failed recipient declined (NOTIFY=NEVER, or a list without FAILURE): then
the entry simply leaves the queue.  Nothing is ever sent for a null sender.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred

from mta.envelope import DeliveryResult, RecipientState, Reply
from mta.observe.logging import Logger
from mta.queue.backoff import next_delay
from mta.queue.bounce import delay_reports, failure_reports, success_reports
from mta.queue.entry import QueueEntry

log = Logger()

_INTERNAL = Reply(451, "4.3.0", "internal delivery error")


class QueueRunner(Service):
    """Delivers spooled entries with `agent` (an IDeliveryAgent)."""

    def __init__(
        self,
        spool,
        agent,
        reactor,
        retry_schedule=(60.0, 300.0, 900.0, 1800.0, 3600.0),
        max_age: float = 5 * 86400.0,
        concurrency: int = 20,
        *,
        jitter: float = 0.0,
        random=None,
        window: int = 10000,
        bouncer=None,
        delay_warning: float = 4 * 3600.0,
    ):
        self.spool = spool
        self.agent = agent
        self.reactor = reactor
        self.retry_schedule = tuple(retry_schedule)
        self.max_age = max_age
        self.concurrency = max(1, concurrency)
        self.window = window
        self.bouncer = bouncer  # mta.queue.bounce.Bouncer, or None: failures go to dead/
        # Age (s) after which NOTIFY=DELAY recipients get one delay notice; 0 = never.
        self.delay_warning = delay_warning
        # Entries that got their delay notice (in memory: after a restart a second
        # notice is possible; at most one per entry per process).
        self._delay_warned: set[str] = set()
        self._jitter = jitter
        self._random = random
        self._fresh: deque[QueueEntry] = deque()
        self._due: deque[tuple[str, bool]] = deque()
        self._waiting: list[tuple[float, int, str, bool]] = []
        self._seq = itertools.count()
        self._active: dict[str, Deferred] = {}
        self._loading = 0
        # Queue control (mta.queue.control): qids being loaded, qids taken out of the
        # schedule for hold/delete, and who waits for an attempt or load to end.
        self._loading_ids: dict[str, int] = {}
        self._withdrawn: set[str] = set()
        self._settle: dict[str, list[Deferred]] = {}
        self._timer = None
        self._stopping = False
        self.recovery: Deferred | None = None

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.spool.on_commit = self.enqueue
        self.recovery = self.spool.recover()
        self.recovery.addCallbacks(self._recovered, self._recovery_failed)

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self.spool.on_commit == self.enqueue:
            self.spool.on_commit = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = DeferredList(list(self._active.values()))
        d.addCallback(lambda _: self.spool.wait_idle())
        return d

    def _recovered(self, found: list[tuple[float, str]]) -> None:
        now = self.reactor.seconds()
        for due, qid in found:
            if due <= now:
                self._due.append((qid, True))
            else:
                heapq.heappush(self._waiting, (due, next(self._seq), qid, True))
        log.info("recovered {count} queued message(s)", count=len(found), event="recovered")
        self._arm()
        self._pump()

    def _recovery_failed(self, f) -> None:
        log.failure("queue recovery failed", failure=f, event="recovery_failed")

    # -- intake ---------------------------------------------------------------------

    def enqueue(self, entry: QueueEntry) -> None:
        """A freshly committed entry (the spool's on_commit hook)."""
        if len(self._fresh) >= self._slots():
            entry.body = None  # it waits: keep the metadata only, delivery reads the file
        if len(self._fresh) < self.window:
            self._fresh.append(entry)
        else:
            self._due.append((entry.qid, False))
        self._pump()

    def flush(self) -> int:
        """Make every deferred entry due now (``mta-admin queue flush``)."""
        count = len(self._waiting)
        while self._waiting:
            _, _, qid, recovered = heapq.heappop(self._waiting)
            self._due.append((qid, recovered))
        self._arm()
        self._pump()
        return count

    def depth(self) -> dict[str, int]:
        """Queue depth by state, for metrics."""
        return {
            "incoming": len(self._fresh),
            "active": len(self._active) + self._loading,
            "ready": len(self._due),
            "deferred": len(self._waiting),
        }

    # -- scheduling -----------------------------------------------------------------

    def _slots(self) -> int:
        return self.concurrency - len(self._active) - self._loading

    def _pump(self) -> None:
        if self._stopping or not self.running:
            return
        while self._slots() > 0 and (self._fresh or self._due):
            if self._fresh:
                self._begin(self._fresh.popleft())
            else:
                qid, recovered = self._due.popleft()
                self._loading += 1
                self._loading_ids[qid] = self._loading_ids.get(qid, 0) + 1
                d = self.spool.load(qid)
                d.addCallbacks(
                    self._loaded, self._load_failed, (qid, recovered), None, (qid, recovered)
                )

    def _loaded(self, entry: QueueEntry | None, qid: str, recovered: bool) -> None:
        self._loading -= 1
        self._loaded_id(qid)
        if qid in self._withdrawn:
            self._settled(qid)
        elif entry is None:
            log.info("{qid} left the queue before its attempt", qid=qid, event="gone")
        elif self._stopping:
            pass  # still on disk; the next start recovers it
        else:
            entry.recovered = recovered
            self._begin(entry)
        self._pump()

    def _load_failed(self, f, qid: str, recovered: bool) -> None:
        self._loading -= 1
        self._loaded_id(qid)
        if qid in self._withdrawn:
            self._settled(qid)
            self._pump()
            return
        log.failure("cannot load {qid}; retrying later", failure=f, qid=qid, event="load_failed")
        delay = next_delay(1, self.retry_schedule) or 60.0
        heapq.heappush(
            self._waiting, (self.reactor.seconds() + delay, next(self._seq), qid, recovered)
        )
        self._arm()
        self._pump()

    def _begin(self, entry: QueueEntry) -> None:
        d = Deferred.fromCoroutine(self._attempt(entry))
        self._active[entry.qid] = d
        d.addErrback(lambda f: log.failure("attempt for {qid} failed", failure=f, qid=entry.qid))
        d.addBoth(self._ended, entry.qid)

    def _ended(self, _, qid: str) -> None:
        self._active.pop(qid, None)
        if qid in self._withdrawn:
            self._settled(qid)
        self._pump()

    # -- queue control (mta.queue.control) -------------------------------------------

    def withdraw(self, qid: str) -> Deferred:
        """Take `qid` out of the schedule, for hold or delete.  Fires once no attempt
        or load of it is in flight, so its files can then be moved without a race;
        until `readmit` or `forget` it is never started again."""
        self._withdrawn.add(qid)
        self._unschedule(qid)
        d: Deferred = Deferred()
        if qid in self._active or qid in self._loading_ids:
            self._settle.setdefault(qid, []).append(d)
        else:
            d.callback(None)
        return d

    def readmit(self, qid: str) -> None:
        """Schedule `qid` now (released, requeued, or a failed hold)."""
        self._withdrawn.discard(qid)
        self._due.append((qid, True))
        self._pump()

    def forget(self, qid: str) -> None:
        """End a withdrawal whose entry left the active queue."""
        self._withdrawn.discard(qid)
        self._delay_warned.discard(qid)

    def retry(self, qid: str) -> str:
        """Make a deferred `qid` due now: "scheduled", "busy" (being tried or already
        due) or "unknown"."""
        if any(item[2] == qid for item in self._waiting):
            self._unschedule(qid)
            self._due.append((qid, False))
            self._pump()
            return "scheduled"
        if (
            qid in self._active
            or qid in self._loading_ids
            or any(q == qid for q, _ in self._due)
            or any(e.qid == qid for e in self._fresh)
        ):
            return "busy"
        return "unknown"

    def _unschedule(self, qid: str) -> None:
        if any(e.qid == qid for e in self._fresh):
            self._fresh = deque(e for e in self._fresh if e.qid != qid)
        if any(q == qid for q, _ in self._due):
            self._due = deque(item for item in self._due if item[0] != qid)
        if any(item[2] == qid for item in self._waiting):
            self._waiting = [item for item in self._waiting if item[2] != qid]
            heapq.heapify(self._waiting)
            self._arm()

    def _loaded_id(self, qid: str) -> None:
        n = self._loading_ids.get(qid, 0) - 1
        if n > 0:
            self._loading_ids[qid] = n
        else:
            self._loading_ids.pop(qid, None)

    def _settled(self, qid: str) -> None:
        self._unschedule(qid)  # an attempt that ended deferred re-added it
        if qid in self._active or qid in self._loading_ids:
            return
        for d in self._settle.pop(qid, []):
            d.callback(None)

    def _arm(self) -> None:
        if not self._waiting or self._stopping:
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
        self._pump()

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self, entry: QueueEntry) -> None:
        qid = entry.qid
        pending = entry.pending_recipients()
        successes = []
        if pending:
            try:
                results = await maybeDeferred(self.agent.deliver, entry, pending)
            except Exception as e:
                log.failure("delivery agent raised for {qid}", qid=qid)
                results = [
                    DeliveryResult(r, RecipientState.DEFERRED, f"{_INTERNAL}: {e!r}", _INTERNAL)
                    for r in pending
                ]
            entry.attempts += 1
            entry.body = None  # a later attempt reads the queue file
            answered = {r.recipient for r in results}
            results = list(results) + [
                DeliveryResult.deferred(r, "no result from delivery agent")
                for r in pending
                if r not in answered
            ]
            changed = entry.apply(results)
            self._log_changes(entry, changed)
            if changed.get(RecipientState.DELIVERED):
                newly = set(changed[RecipientState.DELIVERED])
                successes = success_reports(entry, [r for r in results if r.recipient in newly])
        now = self.reactor.seconds()
        expires = entry.created + self.max_age
        if not entry.is_finished:
            delay = next_delay(
                entry.attempts, self.retry_schedule, jitter=self._jitter, random=self._random
            )
            if delay is None or now >= expires:
                reason = f"5.4.7 delivery time expired after {entry.attempts} attempt(s): {entry.last_error}"
                failed = entry.fail_remaining(reason)
                log.warn(
                    "{qid} expired for {recipients}",
                    qid=qid,
                    recipients=[str(r) for r in failed],
                    event="expired",
                    detail=reason,
                )
            else:
                entry.next_attempt = min(now + delay, expires)
                try:
                    await self.spool.record(entry)
                except Exception:
                    log.failure("cannot record status of {qid}", qid=qid, event="record_failed")
                heapq.heappush(self._waiting, (entry.next_attempt, next(self._seq), qid, False))
                log.info(
                    "{qid} deferred until {next_attempt}: {detail}",
                    qid=qid,
                    next_attempt=entry.next_attempt,
                    attempts=entry.attempts,
                    detail=entry.last_error,
                    event="deferred",
                )
                self._arm()
                await self._notify(entry, successes + self._delays(entry, now, expires))
                return
        self._delay_warned.discard(qid)
        if entry.has_failures:
            failures = failure_reports(entry)
            if self._sends_dsn(entry) and not failures:
                # Every failed recipient declined a failure notice (NOTIFY).
                await self._notify(entry, successes)
                await self.spool.finish(entry)
                log.info(
                    "{qid} completed; failures not reported as NOTIFY asked",
                    qid=qid,
                    event="done_unreported",
                )
                return
            if await self._bounce(entry, successes + failures):
                await self.spool.finish(entry)
                log.info("{qid} completed with a bounce", qid=qid, event="done_bounced")
                return
            reason = entry.last_error or "permanent failure"
            await self.spool.bury(entry, reason)
            log.warn("{qid} moved to dead letters: {reason}", qid=qid, reason=reason, event="dead")
        else:
            await self._notify(entry, successes)
            await self.spool.finish(entry)
            log.info("{qid} completed", qid=qid, attempts=entry.attempts, event="done")

    def _sends_dsn(self, entry: QueueEntry) -> bool:
        """A null sender never gets a DSN (no loops): its failures become dead letters."""
        return self.bouncer is not None and not entry.envelope.sender.is_null

    def _delays(self, entry: QueueEntry, now: float, expires: float) -> list:
        """The delay notice due now, if any: once per entry, past `delay_warning`."""
        if (
            not self.delay_warning
            or entry.qid in self._delay_warned
            or now - entry.created < self.delay_warning
            or not self._sends_dsn(entry)
        ):
            return []
        reports = delay_reports(entry, expires)
        if reports:
            self._delay_warned.add(entry.qid)
        return reports

    async def _bounce(self, entry: QueueEntry, reports: list) -> bool:
        """True when a DSN now carries the news, so the entry itself may go."""
        if not self._sends_dsn(entry):
            return False
        try:
            return bool(await self.bouncer.notify(entry, reports))
        except Exception:
            log.failure("cannot queue a bounce for {qid}", qid=entry.qid, event="bounce_failed")
            return False

    async def _notify(self, entry: QueueEntry, reports: list) -> None:
        """Queue a success or delay notice; a failure to do so is logged, not fatal."""
        if not reports or not self._sends_dsn(entry):
            return
        try:
            await self.bouncer.notify(entry, reports)
        except Exception:
            log.failure("cannot queue a DSN for {qid}", qid=entry.qid, event="dsn_failed")

    @staticmethod
    def _log_changes(entry: QueueEntry, changed: dict) -> None:
        for state, rcpts in changed.items():
            if state is RecipientState.DEFERRED:
                continue  # logged once, with the retry time, by _attempt
            details = [entry.details[entry.envelope.recipients.index(r)] for r in rcpts]
            level = log.info if state is RecipientState.DELIVERED else log.warn
            level(
                "{qid} {state} for {recipients}: {details}",
                qid=entry.qid,
                state=state.value,
                recipients=[str(r) for r in rcpts],
                details=details,
                event=state.value,
            )
