"""`RecordingAgent`: per-recipient results of the PostgreSQL queue, committed at once.

Wraps the delivery agent the queue runner uses (see `mta.queue.pgstore`): each
destination's delivered/failed results are written to ``queue_recipients`` right
after its delivery returns, before the attempt goes on, so a node that takes the
entry over later never delivers those recipients again.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, FirstError, gatherResults, maybeDeferred

from mta.envelope import Address, RecipientState
from mta.observe.logging import Logger

log = Logger()


class RecordingAgent:
    """An `IDeliveryAgent` around `agent` that commits final results at once.

    Recipients go to `agent` grouped by domain (the relay makes one transaction per
    destination anyway; a quarantined message goes whole, as one copy), and each
    group's delivered/failed results are committed before they are returned, so a
    slow destination never holds back the record of a fast one."""

    def __init__(self, agent, store):
        self.agent = agent
        self.store = store

    def deliver(self, job, recipients):
        groups: dict[str, list[Address]] = {}
        if job.envelope.quarantine is not None:
            groups[""] = list(recipients)  # one quarantined copy, whatever the domains
        else:
            for r in recipients:
                groups.setdefault(r.domain.lower(), []).append(r)
        waits = [self._one(job, group) for group in groups.values()]
        d = gatherResults(waits, consumeErrors=True)
        d.addCallback(lambda lists: [r for results in lists for r in results])
        return d.addErrback(_first_error)

    def _one(self, job, group: list[Address]) -> Deferred:
        d = maybeDeferred(self.agent.deliver, job, group)
        return d.addCallback(self._record, job)

    def _record(self, results, job):
        final = []
        by_address = {r.recipient: r for r in results}
        for i, rcpt in enumerate(job.envelope.recipients):
            result = by_address.get(rcpt)
            if result is None or result.state not in (
                RecipientState.DELIVERED,
                RecipientState.FAILED,
            ):
                continue
            if job.states and job.states[i] in (RecipientState.DELIVERED, RecipientState.FAILED):
                continue
            detail = result.detail or (str(result.reply) if result.reply else "")
            final.append((i, result.state.value, detail))
        if not final:
            return results
        d = self.store.record_final(job.qid, final)

        def failed(f):
            log.warn(
                "{qid}: cannot record results at once ({error}); recorded with the attempt instead",
                qid=job.qid,
                error=f.getErrorMessage(),
                event="record_failed",
            )

        d.addErrback(failed)
        return d.addCallback(lambda _: results)


def _first_error(f):
    """The failure of the group that failed (gatherResults wraps it)."""
    if f.check(FirstError):
        return f.value.subFailure
    return f
