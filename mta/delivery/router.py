"""Routing: which agent delivers which recipient of a queued message.

Recipients in `local_domains` go to the local agent, the rest to the remote agent
(the outbound relay).  Without a remote agent, remote recipients are *deferred* with
"remote delivery not configured" rather than failed, so mail accepted for relay is
kept until relaying exists.  Both agents run concurrently; an agent that errors
defers its recipients (a bug defers, never bounces).  A message a policy check
quarantined (`Envelope.quarantine` set) goes, every recipient of it, to the
quarantine agent instead; without one it is deferred, never delivered.
"""

from __future__ import annotations

from twisted.internet.defer import DeferredList, maybeDeferred, succeed
from zope.interface import implementer

from mta.envelope import DeliveryResult, RecipientState, Reply
from mta.interfaces import IDeliveryAgent
from mta.observe.logging import Logger

log = Logger()

NOT_CONFIGURED = Reply(451, "4.4.0", "remote delivery not configured")
NO_QUARANTINE = Reply(451, "4.3.0", "quarantine not configured")


@implementer(IDeliveryAgent)
class Router:
    def __init__(self, local_domains, local_agent, remote_agent=None, quarantine_agent=None):
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.local_agent = local_agent
        self.remote_agent = remote_agent
        self.quarantine_agent = quarantine_agent

    def is_local(self, recipient) -> bool:
        return not recipient.domain or recipient.domain.lower() in self.local_domains

    def deliver(self, job, recipients):
        if job.envelope.quarantine is not None:
            return self._quarantine(job, recipients)
        local = [r for r in recipients if self.is_local(r)]
        remote = [r for r in recipients if not self.is_local(r)]
        calls = []
        if local:
            calls.append((local, self._call(self.local_agent, job, local)))
        if remote:
            if self.remote_agent is None:
                results = [
                    DeliveryResult(r, RecipientState.DEFERRED, str(NOT_CONFIGURED), NOT_CONFIGURED)
                    for r in remote
                ]
                calls.append((remote, succeed(results)))
            else:
                calls.append((remote, self._call(self.remote_agent, job, remote)))
        if len(calls) == 1:  # the usual case: no need to gather
            [(rcpts, d)] = calls
            return d.addErrback(self._failed, job, rcpts)
        d = DeferredList([c for _, c in calls], consumeErrors=True)
        return d.addCallback(self._combine, job, [rcpts for rcpts, _ in calls])

    def _quarantine(self, job, recipients):
        recipients = list(recipients)
        if self.quarantine_agent is None:
            return succeed(
                [
                    DeliveryResult(r, RecipientState.DEFERRED, str(NO_QUARANTINE), NO_QUARANTINE)
                    for r in recipients
                ]
            )
        d = self._call(self.quarantine_agent, job, recipients)
        return d.addErrback(self._failed, job, recipients)

    @staticmethod
    def _call(agent, job, recipients):
        return maybeDeferred(agent.deliver, job, recipients)

    @classmethod
    def _combine(cls, outcomes, job, groups) -> list[DeliveryResult]:
        results: list[DeliveryResult] = []
        for (ok, value), rcpts in zip(outcomes, groups):
            results.extend(value if ok else cls._failed(value, job, rcpts))
        return results

    @staticmethod
    def _failed(failure, job, rcpts) -> list[DeliveryResult]:
        log.failure("delivery agent failed for {qid}", failure=failure, qid=job.qid)
        reply = Reply(451, "4.3.0", "internal delivery error")
        return [
            DeliveryResult(
                r, RecipientState.DEFERRED, f"{reply}: {failure.getErrorMessage()}", reply
            )
            for r in rcpts
        ]
