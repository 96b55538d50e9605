"""The built-in rules as IPolicyChecks: relay, sender ownership, rate limits."""

from __future__ import annotations

import ipaddress

from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from mta.config import build_config
from mta.envelope import Address
from mta.interfaces import IPolicyCheck
from mta.policy.compose import policy_pipeline
from mta.policy.pipeline import CHECK_TIMEOUT
from mta.policy.ratelimit import RATE_LIMITED, RateLimitCheck, RateLimiter
from mta.policy.relay import RELAY_DENIED, USER_UNKNOWN, RelayCheck
from mta.policy.sender import SENDER_NOT_OWNED, SenderCheck
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.testing import FakeDirectory, FakeSenderPolicy

ALICE = Address("alice", "example.test")


def ctx(**fields) -> PolicyContext:
    return PolicyContext(fields.pop("client_address", "192.0.2.1"), "smtp", **fields)


def relay(directory=None) -> RelayCheck:
    directory = directory or FakeDirectory(
        {"team@example.test": ("alice@example.test", "bob@example.test")}
    )
    return RelayCheck(["example.test"], [ipaddress.ip_network("10.0.0.0/8")], directory)


def test_builtin_checks_provide_the_interface():
    for check in (
        relay(),
        SenderCheck(FakeSenderPolicy({})),
        RateLimitCheck(RateLimiter(task.Clock(), 1), "ip"),
        RateLimitCheck(RateLimiter(task.Clock(), 1), "user"),
    ):
        assert verifyObject(IPolicyCheck, check)
        assert all(isinstance(p, Phase) for p in check.phases)


def test_relay_check_resolves_local_recipients_and_refuses_relaying():
    check = relay()
    team = check.check(Phase.RCPT, ctx(recipient=Address("team", "example.test")))
    assert team.action is Action.ACCEPT
    assert [str(r) for r in team.recipients] == ["alice@example.test", "bob@example.test"]
    assert str(team.reply) == "250 2.1.5 Ok"
    unknown = check.check(Phase.RCPT, ctx(recipient=Address("nobody", "example.test")))
    assert unknown.reply == USER_UNKNOWN and unknown.action is Action.REJECT
    remote = Address("x", "other.test")
    assert check.check(Phase.RCPT, ctx(recipient=remote)).reply == RELAY_DENIED
    trusted = check.check(Phase.RCPT, ctx(recipient=remote, client_address="10.1.2.3"))
    assert trusted.recipients == (remote,)
    authed = check.check(Phase.RCPT, ctx(recipient=remote, authenticated_as="alice@example.test"))
    assert authed.recipients == (remote,)


def test_relay_check_waits_for_a_slow_directory():
    directory = FakeDirectory({"alice@example.test": ("alice@example.test",)}, deferred=True)
    d = relay(directory).check(Phase.RCPT, ctx(recipient=ALICE))
    assert isinstance(d, defer.Deferred) and not d.called
    directory.flush()
    assert d.result.recipients == (ALICE,)


def test_sender_check_answers_at_once_for_the_usual_cases():
    check = SenderCheck(FakeSenderPolicy({"alice@example.test": {"sales@example.test"}}))
    assert check.check(Phase.MAIL, ctx(sender=ALICE)) is Verdict.ACCEPT  # not authenticated
    own = ctx(sender=ALICE, authenticated_as="Alice@Example.test")
    assert check.check(Phase.MAIL, own) is Verdict.ACCEPT
    null = ctx(sender=Address("", ""), authenticated_as="alice@example.test")
    assert check.check(Phase.MAIL, null) is Verdict.ACCEPT
    sales = ctx(sender=Address("sales", "example.test"), authenticated_as="alice@example.test")
    assert check.check(Phase.MAIL, sales).result is Verdict.ACCEPT
    ceo = ctx(sender=Address("ceo", "example.test"), authenticated_as="alice@example.test")
    verdict = check.check(Phase.MAIL, ceo).result
    assert (verdict.action, verdict.reply) == (Action.REJECT, SENDER_NOT_OWNED)


def test_rate_limit_checks_per_ip_and_per_user():
    clock = task.Clock()
    per_ip = RateLimitCheck(RateLimiter(clock, 1), "ip")
    per_user = RateLimitCheck(RateLimiter(clock, 1), "user")
    assert (per_ip.name, per_user.name) == ("rate-ip", "rate-user")
    assert per_ip.check(Phase.MAIL, ctx()) is Verdict.ACCEPT
    assert per_ip.check(Phase.MAIL, ctx()).reply == RATE_LIMITED
    assert per_ip.check(Phase.MAIL, ctx(client_address="192.0.2.2")) is Verdict.ACCEPT
    for _ in range(3):  # unauthenticated sessions are not counted per user
        assert per_user.check(Phase.MAIL, ctx()) is Verdict.ACCEPT
    alice = ctx(authenticated_as="alice@example.test")
    assert per_user.check(Phase.MAIL, alice) is Verdict.ACCEPT
    assert per_user.check(Phase.MAIL, alice).action is Action.TEMPFAIL


def test_composition_root_pipeline_keeps_the_relay_rule_fail_closed():
    config = build_config(
        {
            "local_domains": ["example.test"],
            "postmaster": "pm@example.test",
            "limits": {"messages_per_ip_per_minute": 10},
            "checks": {"timeout": 5, "fail": "open"},
        }
    )
    clock = task.Clock()
    directory = FakeDirectory({}, deferred=True)
    pipeline = policy_pipeline(config, clock, directory, FakeSenderPolicy({}))
    assert [c.name for c in pipeline.checks] == ["rate-ip", "sender", "relay", "quota"]
    assert pipeline.timeout == 5.0
    d = pipeline.run(Phase.RCPT, ctx(recipient=ALICE))
    clock.advance(5)
    assert d.result.reply == CHECK_TIMEOUT, "a hung directory must never open the relay"


def test_composition_root_adds_dnsbl_and_attachment_checks_when_configured():
    config = build_config(
        {
            "local_domains": ["example.test"],
            "postmaster": "pm@example.test",
            "dns": {"nameservers": ["127.0.0.1:5353"]},
            "checks": {
                "dnsbl": ["bl.test"],
                "dnsbl_action": "reject",
                "blocked_attachments": ["exe"],
                "attachment_action": "quarantine",
            },
        }
    )
    pipeline = policy_pipeline(config, task.Clock(), FakeDirectory({}), FakeSenderPolicy({}))
    assert [c.name for c in pipeline.checks] == ["dnsbl", "sender", "relay", "quota", "attachments"]
    dnsbl, attachments = pipeline.checks[0], pipeline.checks[-1]
    assert (dnsbl.zones, dnsbl.action) == (("bl.test",), "reject")
    assert attachments.action == "quarantine"
    assert Phase.CONNECT in pipeline.phases and Phase.DATA in pipeline.phases
