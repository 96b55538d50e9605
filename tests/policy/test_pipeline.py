"""PolicyPipeline: order, first refusal wins, headers, quarantine, timeouts, failures."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from mta.envelope import Address, Reply
from mta.interfaces import IPolicyCheck
from mta.policy.pipeline import CHECK_FAILED, CHECK_TIMEOUT, PolicyPipeline
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.testing import FakePolicyCheck

NO = Reply(550, "5.7.1", "No")
LATER = Reply(450, "4.7.1", "Later")
CTX = PolicyContext("192.0.2.1", "smtp", recipient=Address("a", "example.test"))
ALICE = Address("alice", "example.test")


def pipeline(*checks, **options) -> tuple[PolicyPipeline, task.Clock]:
    clock = task.Clock()
    return PolicyPipeline(checks, clock, **{"timeout": 10.0, **options}), clock


def result(value):
    """The verdict of a run that must have answered synchronously."""
    assert isinstance(value, Verdict), f"expected a plain Verdict, got {value!r}"
    return value


def fired(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_fake_check_provides_the_interface():
    assert verifyObject(IPolicyCheck, FakePolicyCheck())


def test_a_phase_without_checks_answers_the_shared_accept():
    p, _ = pipeline(FakePolicyCheck(phases=(Phase.RCPT,)))
    assert p.run(Phase.MAIL, CTX) is Verdict.ACCEPT
    assert PolicyPipeline([], task.Clock()).run(Phase.DATA, CTX) is Verdict.ACCEPT
    assert p.phases == {Phase.RCPT}


def test_synchronous_checks_answer_without_a_deferred_or_a_new_verdict():
    a = FakePolicyCheck("a", [Phase.MAIL])
    b = FakePolicyCheck("b", [Phase.MAIL], {Phase.MAIL: Verdict.CONTINUE})
    p, _ = pipeline(a, b)
    assert p.run(Phase.MAIL, CTX) is Verdict.ACCEPT
    assert a.calls == [(Phase.MAIL, CTX)] and b.calls == [(Phase.MAIL, CTX)]


def test_the_one_verdict_with_something_is_returned_as_it_is():
    resolved = Verdict.accept(recipients=(ALICE,), reply=Reply(250, "2.1.5", "Ok"))
    p, _ = pipeline(
        FakePolicyCheck("a", [Phase.RCPT]), FakePolicyCheck("b", verdicts={Phase.RCPT: resolved})
    )
    assert p.run(Phase.RCPT, CTX) is resolved


def test_checks_run_in_order_and_the_first_refusal_wins():
    order = []

    class Recording(FakePolicyCheck):
        def check(self, phase, context):
            order.append(self.name)
            return super().check(phase, context)

    first = Recording("first", [Phase.RCPT])
    refuse = Recording("refuse", verdicts={Phase.RCPT: Verdict.reject(NO)})
    later = Recording("later", verdicts={Phase.RCPT: Verdict.tempfail(LATER)})
    p, _ = pipeline(first, refuse, later)
    verdict = result(p.run(Phase.RCPT, CTX))
    assert (verdict.action, verdict.reply) == (Action.REJECT, NO)
    assert order == ["first", "refuse"]
    assert later.calls == []


@pytest.mark.parametrize(
    "final",
    [Verdict.reject(NO), Verdict.tempfail(LATER), Verdict.discard("blackhole")],
    ids=["reject", "tempfail", "discard"],
)
def test_a_final_verdict_ends_the_phase(final):
    after = FakePolicyCheck("after", [Phase.DATA])
    p, _ = pipeline(FakePolicyCheck("x", verdicts={Phase.DATA: final}), after)
    assert p.run(Phase.DATA, CTX) is final
    assert after.calls == []


def test_headers_accumulate_in_order_and_recipients_come_from_the_resolving_check():
    ok = Reply(250, "2.1.5", "Ok")
    checks = [
        FakePolicyCheck("tag1", verdicts={Phase.RCPT: Verdict.continue_(headers=(b"X-A: 1\r\n",))}),
        FakePolicyCheck(
            "relay", verdicts={Phase.RCPT: Verdict.accept(reply=ok, recipients=(ALICE,))}
        ),
        FakePolicyCheck("tag2", verdicts={Phase.RCPT: Verdict.accept(headers=(b"X-B: 2\r\n",))}),
        FakePolicyCheck(
            "late", verdicts={Phase.RCPT: Verdict.accept(recipients=(Address("x", "y.test"),))}
        ),
    ]
    p, _ = pipeline(*checks)
    verdict = result(p.run(Phase.RCPT, CTX))
    assert verdict.action is Action.ACCEPT
    assert verdict.headers == (b"X-A: 1\r\n", b"X-B: 2\r\n")
    assert verdict.recipients == (ALICE,)
    assert verdict.reply == ok


def test_only_continue_with_headers_still_accepts():
    p, _ = pipeline(FakePolicyCheck(verdicts={Phase.DATA: Verdict.continue_(headers=(b"X: y",))}))
    verdict = result(p.run(Phase.DATA, CTX))
    assert (verdict.action, verdict.headers) == (Action.ACCEPT, (b"X: y",))


def test_quarantine_accumulates_reasons_and_later_checks_still_run():
    spam = Verdict.quarantine("spam score 9.1", headers=(b"X-Spam: yes\r\n",))
    virus = Verdict.quarantine("looks like EICAR")
    last = FakePolicyCheck("last", [Phase.DATA])
    p, _ = pipeline(
        FakePolicyCheck("spam", verdicts={Phase.DATA: spam}),
        FakePolicyCheck("ok", verdicts={Phase.DATA: Verdict.accept(headers=(b"X-Ok: 1\r\n",))}),
        FakePolicyCheck("virus", verdicts={Phase.DATA: virus}),
        last,
    )
    verdict = result(p.run(Phase.DATA, CTX))
    assert verdict.action is Action.QUARANTINE
    assert verdict.reason == "spam score 9.1; looks like EICAR"
    assert verdict.headers == (b"X-Spam: yes\r\n", b"X-Ok: 1\r\n")
    assert len(last.calls) == 1


def test_a_refusal_after_a_quarantine_still_refuses():
    p, _ = pipeline(
        FakePolicyCheck("q", verdicts={Phase.DATA: Verdict.quarantine("meh")}),
        FakePolicyCheck("r", verdicts={Phase.DATA: Verdict.reject(NO)}),
    )
    assert result(p.run(Phase.DATA, CTX)).reply == NO


def test_asynchronous_checks_are_waited_for_in_order():
    slow = FakePolicyCheck("slow", [Phase.MAIL], hold=True)
    tag = FakePolicyCheck("tag", verdicts={Phase.MAIL: Verdict.accept(headers=(b"X: 1\r\n",))})
    p, _ = pipeline(slow, tag)
    d = p.run(Phase.MAIL, CTX)
    assert isinstance(d, defer.Deferred) and not d.called
    assert tag.calls == [], "the next check waits for the pending one"
    slow.release()
    verdict = fired(d)
    assert verdict.headers == (b"X: 1\r\n",) and verdict.action is Action.ACCEPT


def test_an_asynchronous_refusal_skips_the_rest():
    slow = FakePolicyCheck("slow", verdicts={Phase.RCPT: Verdict.reject(NO)}, hold=True)
    after = FakePolicyCheck("after", [Phase.RCPT])
    p, _ = pipeline(slow, after)
    d = p.run(Phase.RCPT, CTX)
    slow.release()
    assert fired(d).reply == NO and after.calls == []


def test_timeout_fails_closed_with_451_4_4_3_on_the_injected_clock():
    hung = FakePolicyCheck("spamd", [Phase.DATA], hold=True)
    after = FakePolicyCheck("after", [Phase.DATA])
    p, clock = pipeline(hung, after)
    d = p.run(Phase.DATA, CTX)
    clock.advance(9.9)
    assert not d.called
    clock.advance(0.1)
    verdict = fired(d)
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, CHECK_TIMEOUT)
    assert str(verdict.reply) == "451 4.4.3 Error: a policy check timed out, try again later"
    assert after.calls == []
    hung.release()  # a late answer is ignored, not an AlreadyCalledError
    assert not clock.getDelayedCalls()


def test_timeout_fails_open_when_configured_and_the_next_check_runs():
    hung = FakePolicyCheck("spamd", [Phase.DATA], hold=True)
    after = FakePolicyCheck("after", verdicts={Phase.DATA: Verdict.accept(headers=(b"X: 1",))})
    p, clock = pipeline(hung, after, fail_open=True)
    d = p.run(Phase.DATA, CTX)
    clock.advance(10)
    verdict = fired(d)
    assert (verdict.action, verdict.headers) == (Action.ACCEPT, (b"X: 1",))
    assert len(after.calls) == 1


def test_fail_mode_per_check_overrides_the_default():
    relay = FakePolicyCheck("relay", [Phase.RCPT], hold=True)
    p, clock = pipeline(relay, fail_open=True, fail_open_by_check={"relay": False})
    d = p.run(Phase.RCPT, CTX)
    clock.advance(10)
    assert fired(d).reply == CHECK_TIMEOUT
    tag = FakePolicyCheck("tag", [Phase.RCPT], error=RuntimeError("boom"))
    p, _ = pipeline(tag, fail_open_by_check={"tag": True})
    assert p.run(Phase.RCPT, CTX) is Verdict.ACCEPT


def test_an_exception_is_a_451_never_a_5xx():
    broken = FakePolicyCheck("broken", [Phase.MAIL], error=KeyError("bug"))
    after = FakePolicyCheck("after", [Phase.MAIL])
    p, _ = pipeline(broken, after)
    verdict = result(p.run(Phase.MAIL, CTX))
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, CHECK_FAILED)
    assert str(verdict.reply) == "451 4.3.0 Error: internal error, try again later"
    assert after.calls == []


def test_a_failed_deferred_is_a_451():
    class Failing(FakePolicyCheck):
        def check(self, phase, context):
            return defer.fail(OSError("connection refused"))

    p, _ = pipeline(Failing("clamd", [Phase.DATA]))
    assert fired(p.run(Phase.DATA, CTX)).reply == CHECK_FAILED


@pytest.mark.parametrize("answer", [None, "ok", Reply(250, "2.0.0", "Ok")])
def test_an_answer_that_is_not_a_verdict_is_a_451(answer):
    p, _ = pipeline(FakePolicyCheck("odd", verdicts={Phase.MAIL: answer}))
    assert result(p.run(Phase.MAIL, CTX)).reply == CHECK_FAILED
    held = FakePolicyCheck("odd", verdicts={Phase.MAIL: answer}, hold=True)
    p, _ = pipeline(held)
    d = p.run(Phase.MAIL, CTX)
    held.release()
    assert fired(d).reply == CHECK_FAILED


def test_a_refusal_without_a_reply_is_a_451_even_when_failing_open():
    p, _ = pipeline(
        FakePolicyCheck("odd", verdicts={Phase.MAIL: Verdict(Action.REJECT)}), fail_open=True
    )
    verdict = result(p.run(Phase.MAIL, CTX))
    assert (verdict.action, verdict.reply) == (Action.TEMPFAIL, CHECK_FAILED)


def test_verdict_constructors():
    assert Verdict.accept() is Verdict.ACCEPT
    assert Verdict.continue_() is Verdict.CONTINUE
    assert Verdict.reject(NO).refuses and Verdict.tempfail(LATER).refuses
    assert not Verdict.discard("x").refuses and not Verdict.quarantine("x").refuses
    with pytest.raises(ValueError):
        Verdict.reject(LATER)
    with pytest.raises(ValueError):
        Verdict.tempfail(NO)
    with pytest.raises(ValueError):
        PolicyPipeline([], task.Clock(), timeout=0)
