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
the entry simply leaves the queue.  Nothing is ever sent for a null sender, nor
for a quarantined message (its sender may be forged).
"""

from __future__ import annotations

import time

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred

from mta.envelope import DeliveryResult, RecipientState, Reply
from mta.observe.logging import Logger
from mta.queue.backoff import next_delay
from mta.queue.dsn import delay_reports, failure_reports, success_reports
from mta.queue.entry import QueueEntry

log = Logger()

_INTERNAL = Reply(451, "4.3.0", "internal delivery error")


class QueueRunner(Service):
    """Delivers what `store` (an IQueueStore) says is due, with `agent` (an
    IDeliveryAgent)."""

    def __init__(
        self,
        store,
        agent,
        reactor,
        retry_schedule=(60.0, 300.0, 900.0, 1800.0, 3600.0),
        max_age: float = 5 * 86400.0,
        concurrency: int = 20,
        *,
        jitter: float = 0.0,
        random=None,
        bouncer=None,
        delay_warning: float = 4 * 3600.0,
    ):
        self.store = store
        self.agent = agent
        self.reactor = reactor
        self.retry_schedule = tuple(retry_schedule)
        self.max_age = max_age
        self.concurrency = max(1, concurrency)
        self.bouncer = bouncer  # mta.queue.bounce.Bouncer, or None: failures go to dead/
        # Age (s) after which NOTIFY=DELAY recipients get one delay notice; 0 = never.
        self.delay_warning = delay_warning
        # Entries that got their delay notice (in memory: after a restart a second
        # notice is possible; at most one per entry per process).
        self._delay_warned: set[str] = set()
        self._jitter = jitter
        self._random = random
        self._active: dict[str, Deferred] = {}
        self._claiming = False
        self._again = False
        # The last claim got less than it asked for and the store has not called
        # on_ready since: an attempt that ends need not ask again.
        self._drained = False
        self._stopping = False
        self.recovery: Deferred | None = None

    # -- service --------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.store.on_ready = self._ready
        self.recovery = self.store.recover()
        self.recovery.addCallbacks(lambda _: self._ready(), self._recovery_failed)

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self.store.on_ready == self._ready:
            self.store.on_ready = None
        self.store.stop()
        d = DeferredList(list(self._active.values()))
        d.addCallback(lambda _: self.store.wait_idle())
        return d

    def _recovery_failed(self, f) -> None:
        log.failure("queue recovery failed", failure=f, event="recovery_failed")

    def depth(self) -> dict[str, int]:
        """Queue depth by state, for metrics."""
        return self.store.depth()

    # -- scheduling -----------------------------------------------------------------

    def _ready(self) -> None:
        """The store's on_ready: something may be due."""
        self._drained = False
        self._pump()

    def _pump(self) -> None:
        """Claim as much due work as there are free slots."""
        if self._stopping or not self.running or self._drained:
            return
        if self._claiming:
            self._again = True  # claim again once the claim in flight is answered
            return
        while True:
            slots = self.concurrency - len(self._active)
            if slots <= 0:
                return
            self._again = False
            self._claiming = True
            d = self.store.claim(slots)
            if not d.called:
                d.addBoth(self._claimed_later)
                return
            entries = []
            d.addCallbacks(entries.extend, self._claim_failed)
            self._claiming = False
            if len(entries) < slots and not self._again:
                self._drained = True
            for entry in entries:
                self._begin(entry)
            if self._drained:
                return

    def _claimed_later(self, outcome) -> None:
        self._claiming = False
        if isinstance(outcome, list):
            for entry in outcome:
                self._begin(entry)
        else:
            self._claim_failed(outcome)
        self._drained = False  # loads may have come back short: look again
        self._pump()

    def _claim_failed(self, f) -> None:
        log.failure("claiming due queue entries failed", failure=f, event="claim_failed")

    def _begin(self, entry: QueueEntry) -> None:
        d = Deferred.fromCoroutine(self._attempt(entry))
        self._active[entry.qid] = d
        d.addErrback(lambda f: log.failure("attempt for {qid} failed", failure=f, qid=entry.qid))
        d.addBoth(self._ended, entry.qid)

    def _ended(self, _, qid: str) -> None:
        self._active.pop(qid, None)
        self._pump()

    # -- one attempt ----------------------------------------------------------------

    async def _attempt(self, entry: QueueEntry) -> None:
        qid = entry.qid
        pending = entry.pending_recipients()
        successes = []
        if pending:
            try:
                results = await maybeDeferred(self.agent.deliver, entry.job(), pending)
            except Exception as e:
                log.failure("delivery agent raised for {qid}", qid=qid)
                results = [
                    DeliveryResult(r, RecipientState.DEFERRED, f"{_INTERNAL}: {e!r}", _INTERNAL)
                    for r in pending
                ]
            entry.attempts += 1
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
                    await self.store.defer(entry, entry.next_attempt)
                except Exception:
                    log.failure("cannot record status of {qid}", qid=qid, event="record_failed")
                log.info(
                    "{qid} deferred until {until}: {detail}",
                    qid=qid,
                    next_attempt=entry.next_attempt,
                    until=_iso(entry.next_attempt),
                    attempts=entry.attempts,
                    detail=entry.last_error,
                    event="deferred",
                )
                await self._notify(entry, successes + self._delays(entry, now, expires))
                return
        self._delay_warned.discard(qid)
        if entry.has_failures:
            failures = failure_reports(entry)
            if self._sends_dsn(entry) and not failures:
                # Every failed recipient declined a failure notice (NOTIFY).
                await self._notify(entry, successes)
                await self.store.finish(entry)
                log.info(
                    "{qid} completed; failures not reported as NOTIFY asked",
                    qid=qid,
                    event="done_unreported",
                )
                return
            if await self._bounce(entry, successes + failures):
                await self.store.finish(entry)
                log.info("{qid} completed with a bounce", qid=qid, event="done_bounced")
                return
            reason = entry.last_error or "permanent failure"
            await self.store.bury(entry, reason)
            log.warn("{qid} moved to dead letters: {reason}", qid=qid, reason=reason, event="dead")
        else:
            await self._notify(entry, successes)
            await self.store.finish(entry)
            log.info("{qid} completed", qid=qid, attempts=entry.attempts, event="done")

    def _sends_dsn(self, entry: QueueEntry) -> bool:
        """A null sender never gets a DSN (no loops): its failures become dead letters.
        Nor does the sender of a quarantined message: it may be forged (no backscatter)
        and must not learn that the message was held.  A release queues the message
        again, unquarantined, with its DSN request."""
        envelope = entry.envelope
        return (
            self.bouncer is not None and not envelope.sender.is_null and envelope.quarantine is None
        )

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


def _iso(timestamp: float) -> str:
    """UTC ISO-8601 for log lines (``2026-12-04T11:15:55Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
