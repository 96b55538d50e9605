"""`PolicyPipeline`: runs the `IPolicyCheck`s of one SMTP phase, in order.

The session makes one call per phase, `run(phase, context)`, and gets one `Verdict`:

- checks run in the order given; the first REJECT, TEMPFAIL or DISCARD ends the phase
  and is the answer;
- ACCEPT and CONTINUE ask the next check; the first ACCEPT that names recipients (the
  relay check at RCPT) supplies them and its success reply;
- header fields of every check that let the message through accumulate in order;
- QUARANTINE records its reason and asks the next check; the combined answer is then
  QUARANTINE with the reasons joined by "; ".

Each check that answers with a Deferred runs under a timeout on the injected clock
(`Deferred.addTimeout`).  A timeout, an exception, or an answer that is not a
Verdict is never the client's fault and never a 5xx: per check, fail-closed turns it
into a TEMPFAIL (`CHECK_TIMEOUT`, 451 4.4.3, for a timeout, as STYLE rule 7 says:
the server we asked did not answer in time; `CHECK_FAILED`, 451 4.3.0, the session's
internal-error reply, for a bug or a crash) and fail-open logs it and carries on as
if the check had said CONTINUE.  Checks that guard the relay rule must be
fail-closed (the composition root does that).

The hot path costs nothing it does not need: the checks of each phase are a
precomputed tuple, a phase without checks answers the shared `Verdict.ACCEPT`, and
synchronous checks are called in a plain loop: no Deferred, and no allocation unless
two checks each contribute something that has to be combined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mta.envelope import Reply
from mta.observe.logging import Logger
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict

log = Logger()

CHECK_TIMEOUT = Reply(451, "4.4.3", "Error: a policy check timed out, try again later")
CHECK_FAILED = Reply(451, "4.3.0", "Error: internal error, try again later")

_ACCEPT = Verdict.ACCEPT
_CONTINUE = Verdict.CONTINUE
_QUARANTINE = Action.QUARANTINE
_REJECT, _TEMPFAIL, _DISCARD = Action.REJECT, Action.TEMPFAIL, Action.DISCARD


class PolicyPipeline:
    """The checks of every phase, with their timeout and failure mode.

    `timeout` (seconds) bounds each asynchronous check; `fail_open` is the failure
    mode of checks not named in `fail_open_by_check` (check name -> True for
    fail-open, False for fail-closed).
    """

    def __init__(
        self,
        checks: Iterable,
        clock: IReactorTime,
        *,
        timeout: float = 30.0,
        fail_open: bool = False,
        fail_open_by_check: Mapping[str, bool] | None = None,
    ):
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.checks = tuple(checks)
        self._clock = clock
        self.timeout = timeout
        overrides = dict(fail_open_by_check or {})
        self._fail_open = {c.name: overrides.get(c.name, fail_open) for c in self.checks}
        by_phase = [[] for _ in Phase]
        for check in self.checks:
            for phase in check.phases:
                by_phase[Phase(phase).value].append(check)
        # Indexed by `phase._value_` (a plain attribute; `.value` and hashing an
        # Enum member are Python-level calls).
        self._by_phase = tuple(tuple(checks) for checks in by_phase)
        self.phases = frozenset(p for p in Phase if self._by_phase[p.value])

    def __repr__(self) -> str:
        return f"<PolicyPipeline {[c.name for c in self.checks]}>"

    def checks_for(self, phase: Phase) -> tuple:
        return self._by_phase[phase._value_]

    def run(self, phase: Phase, context: PolicyContext) -> Verdict | defer.Deferred:
        """The combined `Verdict` of `phase`'s checks for `context`, or a Deferred
        firing with it when a check answers asynchronously.  Never raises and never
        fails: a broken check becomes a verdict by its failure mode."""
        checks = self._by_phase[phase._value_]
        if not checks:
            return _ACCEPT
        return self._run_from(checks, 0, phase, context, None)

    # -- the loop ------------------------------------------------------------------

    def _run_from(self, checks, start: int, phase: Phase, context, acc):
        for i in range(start, len(checks)):
            check = checks[i]
            try:
                verdict = check.check(phase, context)
            except Exception:
                verdict = self._failed(Failure(), check, phase)
            if type(verdict) is not Verdict:
                if isinstance(verdict, defer.Deferred):
                    return self._wait(verdict, checks, i, phase, context, acc)
                verdict = self._not_a_verdict(verdict, check, phase)
            action = verdict.action
            if action is _REJECT or action is _TEMPFAIL or action is _DISCARD:
                return self._decided(verdict, check, phase)
            acc = verdict if acc is None else _combine(acc, verdict)
        if acc is None or acc is _CONTINUE:
            return _ACCEPT
        if acc.action is Action.CONTINUE:
            return Verdict(
                Action.ACCEPT, acc.reply, acc.headers, acc.recipients, acc.reason, acc.remove
            )
        return acc

    def _wait(self, d: defer.Deferred, checks, i: int, phase: Phase, context, acc):
        check = checks[i]
        d.addTimeout(self.timeout, self._clock)
        d.addErrback(self._failed, check, phase)
        d.addCallback(self._answered, checks, i, phase, context, acc)
        return d

    def _answered(self, verdict, checks, i: int, phase: Phase, context, acc):
        check = checks[i]
        if type(verdict) is not Verdict:
            verdict = self._not_a_verdict(verdict, check, phase)
        action = verdict.action
        if action is _REJECT or action is _TEMPFAIL or action is _DISCARD:
            return self._decided(verdict, check, phase)
        return self._run_from(checks, i + 1, phase, context, _combine(acc, verdict))

    # -- outcomes ------------------------------------------------------------------

    def _decided(self, verdict: Verdict, check, phase: Phase) -> Verdict:
        if verdict.reply is None and verdict.action is not Action.DISCARD:
            # A check that wants to refuse but gives no reply is broken: refuse
            # temporarily (never a 5xx for a bug), whatever its failure mode.
            log.error(
                "policy check {check} at {phase} refused without a reply",
                event="policy_error",
                check=check.name,
                phase=phase.name,
            )
            return Verdict(Action.TEMPFAIL, CHECK_FAILED, reason=f"{check.name}: no reply")
        log.debug(
            "policy {check} at {phase}: {action} ({reason})",
            event="policy_verdict",
            check=check.name,
            phase=phase.name,
            action=verdict.action.value,
            reason=verdict.reason,
        )
        return verdict

    def _not_a_verdict(self, value, check, phase: Phase) -> Verdict:
        return self._failed(
            Failure(TypeError(f"check answered {value!r}, not a Verdict")), check, phase
        )

    def _failed(self, failure: Failure, check, phase: Phase) -> Verdict:
        timed_out = failure.check(defer.TimeoutError, defer.CancelledError) is not None
        fail_open = self._fail_open.get(check.name, False)
        if timed_out:
            log.warn(
                "policy check {check} at {phase} timed out after {timeout}s; failing {mode}",
                event="policy_timeout",
                check=check.name,
                phase=phase.name,
                timeout=self.timeout,
                mode="open" if fail_open else "closed",
            )
        else:
            log.failure(
                "policy check {check} at {phase} failed; failing {mode}",
                failure=failure,
                event="policy_error",
                check=check.name,
                phase=phase.name,
                mode="open" if fail_open else "closed",
            )
        if fail_open:
            return _CONTINUE
        reply = CHECK_TIMEOUT if timed_out else CHECK_FAILED
        return Verdict(Action.TEMPFAIL, reply, reason=f"{check.name}: {reply.text}")


def _combine(acc: Verdict | None, verdict: Verdict) -> Verdict:
    """`acc` (what earlier checks said, None for nothing yet) with `verdict` added."""
    if acc is None or acc is _CONTINUE or acc is _ACCEPT:
        if verdict is _CONTINUE and acc is not None:
            return acc
        return verdict
    if verdict is _CONTINUE or verdict is _ACCEPT:
        return acc
    if verdict.recipients and not acc.recipients:
        # The first check that resolves the recipient supplies the mailboxes and
        # the reply that goes with them.
        reply, recipients = verdict.reply, verdict.recipients
    else:
        reply = acc.reply if acc.reply is not None else verdict.reply
        recipients = acc.recipients
    if acc.action is _QUARANTINE or verdict.action is _QUARANTINE:
        action = _QUARANTINE
        reason = "; ".join(v.reason for v in (acc, verdict) if v.action is _QUARANTINE and v.reason)
    else:
        action = Action.ACCEPT if Action.ACCEPT in (acc.action, verdict.action) else Action.CONTINUE
        reason = acc.reason or verdict.reason
    remove = acc.remove + verdict.remove
    return Verdict(action, reply, acc.headers + verdict.headers, recipients, reason, remove)
