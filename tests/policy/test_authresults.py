"""Authentication-Results (RFC 8601) and `SenderAuthCheck`: SPF at MAIL, DKIM, ARC and
DMARC at the end of DATA, against a real DNS server on loopback, with the check's
bounded thread pool the reactor's."""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted
from zope.interface.verify import verifyObject

from mta.envelope import parse_path
from mta.headers import HeaderMatch, field_present, remove_fields
from mta.interfaces import IPolicyCheck
from mta.policy.authresults import authentication_results, forged_results, from_domains
from mta.policy.dkimverify import DKIMResult
from mta.policy.senderauth import SenderAuthCheck
from mta.policy.spf import SPFResult
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.testing import MemoryBody
from tests.policy.authzone import CLIENT, HOSTNAME, auth_zones, message  # noqa: F401
from tests.policy.test_arc import forwarded

# -- the header field and what removes it ------------------------------------------


def test_authentication_results_field():
    spf = SPFResult("pass", identity="mailfrom", domain="example.test", sender="a@example.test")
    sigs = (
        DKIMResult("pass", "example.test", "sel", "rsa-sha256", b="abcdefgh"),
        DKIMResult("fail", "other.test", "s2", reason="body hash did not verify"),
    )
    field = authentication_results(HOSTNAME, spf, sigs).decode()
    assert field.startswith(f"Authentication-Results: {HOSTNAME};\r\n\t")
    assert field.endswith("\r\n")
    body = field.replace("\r\n\t", " ")
    assert "spf=pass smtp.mailfrom=a@example.test;" in body
    assert (
        "dkim=pass header.d=example.test header.s=sel header.a=rsa-sha256 header.b=abcdefgh;"
        in (body)
    )
    assert "dkim=fail (body hash did not verify) header.d=other.test header.s=s2" in body
    assert authentication_results(HOSTNAME, None, ()).decode().endswith("\tdkim=none\r\n")
    helo = SPFResult("fail", identity="helo", domain="h.test", sender="postmaster@h.test")
    assert b"spf=fail smtp.helo=h.test" in authentication_results(HOSTNAME, helo)


@pytest.mark.parametrize(
    "field, forged",
    [
        (b"Authentication-Results: mx.receiver.test; dkim=pass header.d=x.test\r\n", True),
        (b"Authentication-Results:MX.Receiver.Test;spf=pass\r\n", True),
        (b"Authentication-Results: (ours) mx.receiver.test 1; spf=pass\r\n", True),
        (b"Authentication-Results:\r\n mx.receiver.test;\r\n\tspf=pass\r\n", True),
        (b"Authentication-Results: mx.receiver.test.evil.test; spf=pass\r\n", False),
        (b"Authentication-Results: other.test; spf=pass smtp.mailfrom=mx.receiver.test\r\n", False),
        (b"X-Authentication-Results: mx.receiver.test; spf=pass\r\n", False),
    ],
)
def test_forged_results_match(field, forged):
    head = b"From: a@example.test\r\n" + field + b"Subject: x\r\n\r\nbody\r\n"
    matches = (forged_results(HOSTNAME),)
    assert field_present(head, matches) is forged
    out, removed = remove_fields(head, matches)
    assert removed == int(forged)
    assert (field not in out) is forged
    assert out.endswith(b"Subject: x\r\n\r\nbody\r\n")


def test_remove_fields_stops_at_the_body():
    head = (
        b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes,\r\n\tscore=9\r\nTo: b\r\n\r\nX-Spam-Flag: YES\r\n"
    )
    out, removed = remove_fields(head, (HeaderMatch("x-spam-flag"), HeaderMatch("X-Spam-Status")))
    assert (out, removed) == (b"To: b\r\n\r\nX-Spam-Flag: YES\r\n", 2)


def test_from_domains():
    head = b"From: Alice <alice@Example.TEST>,\r\n bob@other.test\r\nTo: x@y.test\r\n"
    assert from_domains(head) == ["example.test", "other.test"]
    assert from_domains(b"To: x@y.test\r\n") == []
    assert from_domains(b"From: undisclosed\r\n") == []


# -- the check ------------------------------------------------------------------


def make_check(zones, **kw) -> SenderAuthCheck:
    from twisted.internet import reactor

    kw.setdefault("spf", "enforce")
    kw.setdefault("dkim", "enforce")
    kw.setdefault("dmarc", "enforce")
    return SenderAuthCheck(zones.dns(), reactor, reactor.getThreadPool(), HOSTNAME, **kw)


def context(sender="alice@example.test", client=CLIENT, **kw) -> PolicyContext:
    return PolicyContext(
        client,
        "smtp",
        kw.pop("session_id", "S1"),
        helo="client.helo.test",
        sender=parse_path(f"<{sender}>", allow_null=True),
        **kw,
    )


async def run(check, phase, ctx) -> Verdict:
    v = check.check(phase, ctx)
    return v if isinstance(v, Verdict) else await v


async def transaction(check, sender, data, **kw) -> tuple[Verdict, Verdict]:
    ctx = context(sender, **kw)
    mail = await run(check, Phase.MAIL, ctx)
    if mail.refuses:
        return mail, None
    body = MemoryBody(data)
    end = await run(check, Phase.DATA, ctx._replace(queue_id="QID1", body=body, size=len(data)))
    return mail, end


def results_of(verdict: Verdict) -> str:
    (ar,) = [h for h in verdict.headers if h.startswith(b"Authentication-Results:")]
    return ar.decode().replace("\r\n\t", " ")


def test_check_is_a_policy_check(auth_zones):  # noqa: F811
    check = make_check(auth_zones)
    verifyObject(IPolicyCheck, check)
    assert check.phases == (Phase.MAIL, Phase.DATA)
    assert make_check(auth_zones, spf="off").phases == (Phase.DATA,)
    with pytest.raises(ValueError, match="checks.dmarc"):
        make_check(auth_zones, dmarc="on")


@pytest_twisted.ensureDeferred
async def test_authenticated_mail_passes_everything(auth_zones):  # noqa: F811
    check = make_check(auth_zones)
    signed = auth_zones.keys["rsa"].sign(message())
    mail, end = await transaction(check, "alice@example.test", signed)
    assert mail is Verdict.ACCEPT
    assert end.action is Action.ACCEPT or end.action is Action.CONTINUE
    ar = results_of(end)
    assert ar.startswith(f"Authentication-Results: {HOSTNAME}; spf=pass")
    assert "dkim=pass header.d=example.test header.s=sel" in ar
    assert "dmarc=pass (p=reject dis=NONE) header.from=example.test" in ar
    assert "arc=none" in ar
    assert any(h.startswith(b"Received-SPF: Pass") for h in end.headers)
    assert end.remove == ()


@pytest_twisted.ensureDeferred
async def test_spf_fail_is_refused_at_mail_without_dmarc(auth_zones):  # noqa: F811
    check = make_check(auth_zones, dmarc="off")
    mail, _ = await transaction(check, "alice@fail.test", message("a@fail.test"))
    assert mail.action is Action.REJECT
    assert (mail.reply.code, mail.reply.enhanced) == (550, "5.7.23")
    check = make_check(auth_zones, spf="tag", dmarc="off")
    mail, end = await transaction(check, "alice@fail.test", message("a@fail.test"))
    assert mail is Verdict.ACCEPT and "spf=fail" in results_of(end)


@pytest_twisted.ensureDeferred
async def test_spf_fail_waits_for_dmarc(auth_zones):  # noqa: F811
    """With DMARC on, SPF fail is decided at the end of DATA: here fail.test's
    p=reject refuses the message (no aligned DKIM)."""
    check = make_check(auth_zones)
    mail, end = await transaction(check, "alice@fail.test", message("a@fail.test"))
    assert mail is Verdict.ACCEPT
    assert end.action is Action.REJECT
    assert (end.reply.code, end.reply.enhanced) == (550, "5.7.1")
    assert "fail.test" in end.reply.text
    # DKIM aligned with the From domain rescues it (the forwarded-mail case)
    signed = auth_zones.keys["rsa"].sign(message())
    mail, end = await transaction(check, "alice@fail.test", signed)
    assert end.action is not Action.REJECT
    assert "dmarc=pass" in results_of(end) and "spf=fail" in results_of(end)
    # no DMARC policy for the From domain: SPF enforcement applies after all
    mail, end = await transaction(check, "alice@fail.test", message("a@none.test"))
    assert mail is Verdict.ACCEPT and end.action is Action.REJECT
    assert (end.reply.code, end.reply.enhanced) == (550, "5.7.23")


@pytest.mark.parametrize(
    "sender, from_addr, action, dmarc",
    [
        ("alice@soft.test", "a@soft.test", Action.QUARANTINE, "dmarc=fail (p=quarantine"),
        ("alice@neutral.test", "a@neutral.test", Action.ACCEPT, "dmarc=fail (p=none dis=NONE)"),
        ("alice@example.test", "a@pct.test", Action.QUARANTINE, "dmarc=fail (p=reject dis=QUAR"),
        ("alice@example.test", "a@sub.parent.test", Action.REJECT, None),  # sp=reject
        ("alice@example.test", "a@parent.test", Action.ACCEPT, "dmarc=fail (p=none"),
        ("alice@example.test", "a@none.test", Action.ACCEPT, "dmarc=none"),
        ("alice@example.test", "a@mail.strict.test", Action.REJECT, None),  # aspf=s
    ],
)
@pytest_twisted.ensureDeferred
async def test_dmarc_policies(auth_zones, sender, from_addr, action, dmarc):  # noqa: F811
    check = make_check(auth_zones, sample=lambda: 0.99)
    _, end = await transaction(check, sender, message(from_addr))
    got = Action.ACCEPT if end.action is Action.CONTINUE else end.action
    assert got is action, end
    if dmarc is not None:
        assert dmarc in results_of(end)
    if action is Action.QUARANTINE:
        assert "DMARC" in end.reason


@pytest_twisted.ensureDeferred
async def test_dmarc_tag_only_reports(auth_zones):  # noqa: F811
    check = make_check(auth_zones, dmarc="tag", spf="tag")
    _, end = await transaction(check, "alice@fail.test", message("a@fail.test"))
    assert end.action in (Action.ACCEPT, Action.CONTINUE)
    assert "dmarc=fail (p=reject dis=REJECT) header.from=fail.test" in results_of(end)


@pytest_twisted.ensureDeferred
async def test_strict_dkim_alignment(auth_zones):  # noqa: F811
    check = make_check(auth_zones, spf="off")
    sub = auth_zones.keys["strict-sub"].sign(message("a@strict.test"))
    _, end = await transaction(check, "alice@other-org.test", sub)
    assert end.action is Action.REJECT  # d=mail.strict.test is not strict.test
    exact = auth_zones.keys["strict"].sign(message("a@strict.test"))
    _, end = await transaction(check, "alice@other-org.test", exact)
    assert end.action is not Action.REJECT and "dmarc=pass" in results_of(end)


@pytest_twisted.ensureDeferred
async def test_forwarded_message_with_arc_chain(auth_zones):  # noqa: F811
    check = make_check(auth_zones, dmarc="tag")
    _, end = await transaction(check, "list@other-org.test", forwarded(auth_zones))
    ar = results_of(end)
    assert "arc=pass (i=1 forwarder.test" in ar
    assert "dkim=fail" in ar and "dmarc=fail" in ar


@pytest_twisted.ensureDeferred
async def test_forged_results_are_removed(auth_zones):  # noqa: F811
    check = make_check(auth_zones)
    forged = b"Authentication-Results: mx.receiver.test; dmarc=pass header.from=fail.test\r\n"
    signed = auth_zones.keys["rsa"].sign(message(extra=forged))
    _, end = await transaction(check, "alice@example.test", signed)
    assert end.remove == (forged_results(HOSTNAME),)
    # submission does not get our results, but still loses a forged field
    _, end = await transaction(check, "alice@example.test", signed, authenticated_as="alice")
    assert end.headers == () and end.remove == (forged_results(HOSTNAME),)


@pytest_twisted.ensureDeferred
async def test_submission_and_relay_networks_skip_the_checks(auth_zones):  # noqa: F811
    check = make_check(auth_zones, relay_networks=[ipaddress.ip_network("127.0.0.0/8")])
    mail, end = await transaction(check, "alice@fail.test", message("a@fail.test"))
    assert mail is Verdict.ACCEPT and end.headers == () and end.action is not Action.REJECT
    check = make_check(auth_zones)
    mail, end = await transaction(
        check, "alice@fail.test", message("a@fail.test"), authenticated_as="alice@fail.test"
    )
    assert mail is Verdict.ACCEPT and end.headers == () and end.action is not Action.REJECT


@pytest_twisted.ensureDeferred
async def test_dns_failure_fails_closed_or_open(auth_zones):  # noqa: F811
    closed = make_check(auth_zones)
    mail, _ = await transaction(closed, "alice@temp.test", message("a@temp.test"))
    assert mail.action is Action.TEMPFAIL
    assert (mail.reply.code, mail.reply.enhanced) == (451, "4.7.24")
    opened = make_check(auth_zones, fail_open=True)
    mail, end = await transaction(opened, "alice@temp.test", message("a@temp.test"))
    assert mail is Verdict.ACCEPT and "spf=temperror" in results_of(end)
    # the DMARC record cannot be fetched: 451 when closed, dmarc=temperror when open
    _, end = await transaction(closed, "alice@example.test", message("a@x.servfail.test"))
    assert end.action is Action.TEMPFAIL and end.reply.code == 451
    _, end = await transaction(opened, "alice@example.test", message("a@x.servfail.test"))
    assert end.action is not Action.TEMPFAIL and "dmarc=temperror" in results_of(end)


@pytest_twisted.ensureDeferred
async def test_every_verdict_is_logged_with_the_queue_id_and_counted(auth_zones):  # noqa: F811
    from prometheus_client import CollectorRegistry
    from twisted.logger import globalLogPublisher

    from mta.observe.metrics import Metrics, MetricsObserver

    registry = CollectorRegistry()
    observer = MetricsObserver(Metrics(registry))
    events = []
    globalLogPublisher.addObserver(events.append)
    globalLogPublisher.addObserver(observer)
    try:
        check = make_check(auth_zones)
        await transaction(check, "alice@example.test", auth_zones.keys["ed"].sign(message()))
        await transaction(check, "alice@fail.test", message("a@fail.test"))
    finally:
        globalLogPublisher.removeObserver(events.append)
        globalLogPublisher.removeObserver(observer)
    logged = [e for e in events if e.get("event") == "checks"]  # one line per message
    assert [[(r["check"], r["result"]) for r in e["results"]] for e in logged] == [
        [("spf", "pass"), ("dkim", "pass"), ("arc", "none"), ("dmarc", "pass")],
        [("spf", "fail"), ("dkim", "none"), ("arc", "none"), ("dmarc", "fail")],
    ]
    assert [(e["qid"], e["action"]) for e in logged] == [("QID1", "continue"), ("QID1", "reject")]
    assert logged[0]["summary"].startswith("spf=pass (")
    assert "dkim=pass (d=example.test s=" in logged[0]["summary"]
    assert "dkim=none (unsigned)" in logged[1]["summary"]

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert value("mta_check_results_total", check="dmarc", result="fail") == 1
    assert value("mta_check_results_total", check="spf", result="pass") == 1
    assert value("mta_check_duration_seconds_count", check="dkim") == 2


# -- configuration ------------------------------------------------------------------


def test_config_keys_are_validated():
    from mta.config import ConfigError, build_config

    cfg = build_config({"checks": {"spf": "enforce", "dmarc": "tag"}})
    assert (cfg.checks.spf, cfg.checks.dkim, cfg.checks.dmarc, cfg.checks.arc_seal) == (
        "enforce",
        "off",
        "tag",
        False,
    )
    with pytest.raises(ConfigError, match=r"checks\.dkim.*off, tag, enforce"):
        build_config({"checks": {"dkim": "on"}})
    with pytest.raises(ConfigError, match=r"checks\.arc_seal.*\[dkim\] domains"):
        build_config({"checks": {"arc_seal": True, "dmarc": "tag"}})
    with pytest.raises(ConfigError, match=r"checks\.arc_seal.*spf, dkim or dmarc"):
        build_config({"checks": {"arc_seal": True}, "dkim": {"domains": ["example.test"]}})
    with pytest.raises(ConfigError, match=r"checks\.arc_seal.*true or false"):
        build_config({"checks": {"arc_seal": "yes"}})


def test_pipeline_has_the_check_only_when_on(auth_zones):  # noqa: F811
    from twisted.internet import reactor

    from mta.config import build_config
    from mta.policy.compose import policy_pipeline
    from mta.testing import FakeDirectory, FakeSenderPolicy

    def names(checks):
        cfg = build_config({"checks": checks, "dns": {"nameservers": [auth_zones.address]}})
        pipeline = policy_pipeline(cfg, reactor, FakeDirectory({}), FakeSenderPolicy({}))
        return [c.name for c in pipeline.checks]

    assert "sender-auth" not in names({})
    assert "sender-auth" in names({"dkim": "tag"})


def test_pipeline_carries_removals_of_every_check():
    """Both checks' removals reach the session, with their headers, through the
    pipeline's combining (CONTINUE and QUARANTINE alike)."""
    from twisted.internet import task

    from mta.policy.pipeline import PolicyPipeline

    first, second = HeaderMatch("X-A"), HeaderMatch("X-B")

    class Fixed:
        phases = (Phase.DATA,)

        def __init__(self, name, verdict):
            self.name, self.verdict = name, verdict

        def check(self, phase, context):
            return self.verdict

    pipeline = PolicyPipeline(
        [
            Fixed("one", Verdict.continue_(headers=(b"X-One: 1\r\n",), remove=(first,))),
            Fixed("two", Verdict.quarantine("why", remove=(second,))),
        ],
        task.Clock(),
    )
    verdict = pipeline.run(Phase.DATA, PolicyContext(CLIENT, "smtp", body=object()))
    assert verdict.action is Action.QUARANTINE
    assert verdict.remove == (first, second) and verdict.headers == (b"X-One: 1\r\n",)
    alone = PolicyPipeline([Fixed("one", Verdict.continue_(remove=(first,)))], task.Clock())
    verdict = alone.run(Phase.DATA, PolicyContext(CLIENT, "smtp", body=object()))
    assert verdict.action is Action.ACCEPT and verdict.remove == (first,)


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.test",
        "  Alice <alice@Example.TEST>  ",
        "Alice Q. Public <a.q+tag@mail.example.test>",
        '"Doe, Jane" <jane@doe.test>',
        '"a\\"b" <x@quoted.test>',
        "=?utf-8?q?J=C3=B6rg?= <j@enc.test>",
        "a@one.test, b@two.test",
        "(comment) c@comment.test",
        "Group: g@group.test;",
        "<>",
        "not an address",
        "a" * 3000 + " x",  # no address: the fast pattern must fail in linear time
    ],
)
def test_from_domains_agrees_with_the_full_parser(value):
    """The fast path for `Name <addr>` gives what email.utils gives for it."""
    import email.utils

    expected = []
    for _name, address in email.utils.getaddresses([value]):
        domain = address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")
        if "@" in address and domain and domain not in expected:
            expected.append(domain)
    assert from_domains(f"From: {value}\r\n".encode()) == expected


@pytest.mark.parametrize(
    "head, present",
    [
        (b"Subject: about X-Spam-Flag: yes\r\n\r\n", False),  # only inside a value
        (b"Subject: s\r\n\r\nX-Spam-Flag: YES\r\n", False),  # only in the body
        (b"x-spam-flag : YES\r\n\r\n", True),  # first line, space before the colon
        (b"Subject: s\n X-Spam-Flag: folded, not a field\nTo: b\n\n", False),
        (b"Subject: s\nX-SPAM-FLAG: YES\n\n", True),  # bare LF line ends
    ],
)
def test_field_present_scans_only_field_names(head, present):
    matches = (HeaderMatch("X-Spam-Flag"),)
    assert field_present(head, matches) is present
    out, removed = remove_fields(head, matches)
    assert removed == int(present)
    if not present:
        assert out is head
