"""DMARC: record discovery in a real DNS server, alignment, policies and pct=."""

from __future__ import annotations

import pytest
import pytest_twisted

from mta.policy import dmarc
from mta.policy.authdns import DNSTemporaryError
from tests.policy.authzone import auth_zones, in_thread  # noqa: F401


@pytest.mark.parametrize(
    "domain, org",
    [
        ("example.test", "example.test"),
        ("a.b.example.test", "example.test"),
        ("mail.example.co.uk", "example.co.uk"),
        ("x.foo.blogspot.com", "foo.blogspot.com"),  # a private suffix of the list
        ("Example.COM.", "example.com"),
        ("test", "test"),
    ],
)
def test_organizational_domain(domain, org):
    assert dmarc.organizational_domain(domain) == org


def test_parse_record():
    r = dmarc.parse_record("v=DMARC1; p=Quarantine; sp=reject; pct=25; adkim=s", "d.test")
    assert (r.policy, r.subdomain_policy, r.pct, r.adkim, r.aspf) == (
        "quarantine",
        "reject",
        25,
        "s",
        "r",
    )
    assert dmarc.parse_record("v=spf1 -all") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus; rua=mailto:x@d.test").policy == "none"
    assert dmarc.parse_record("v=DMARC1; p=reject; pct=500").pct == 100


REJECT = dmarc.DMARCRecord("reject", domain="example.test")
STRICT = dmarc.DMARCRecord("reject", adkim="s", aspf="s", domain="strict.test")


@pytest.mark.parametrize(
    "from_domain, record, spf, dkim, result",
    [
        ("example.test", REJECT, "example.test", [], "pass"),
        ("example.test", REJECT, "bounce.example.test", [], "pass"),  # relaxed SPF
        ("example.test", REJECT, None, ["mail.example.test"], "pass"),  # relaxed DKIM
        ("example.test", REJECT, "other.test", ["other.test"], "fail"),
        ("example.test", REJECT, None, [], "fail"),
        ("strict.test", STRICT, "strict.test", [], "pass"),
        ("strict.test", STRICT, "mail.strict.test", [], "fail"),  # strict SPF
        ("strict.test", STRICT, None, ["mail.strict.test"], "fail"),  # strict DKIM
        ("strict.test", STRICT, None, ["strict.test"], "pass"),
        ("example.test", None, None, [], "none"),
    ],
)
def test_alignment(from_domain, record, spf, dkim, result):
    assert dmarc.evaluate(from_domain, record, spf, dkim).result == result


def test_disposition_follows_policy_subdomain_policy_and_pct():
    fail = dict(spf_pass_domain=None, dkim_pass_domains=[])
    r = dmarc.evaluate("example.test", REJECT, **fail)
    assert (r.policy, r.disposition) == ("reject", "reject")
    parent = dmarc.DMARCRecord("none", subdomain_policy="reject", domain="parent.test")
    assert dmarc.evaluate("parent.test", parent, **fail).disposition == "none"
    assert dmarc.evaluate("sub.parent.test", parent, **fail).disposition == "reject"
    sampled = dmarc.DMARCRecord("reject", pct=0, domain="pct.test")
    r = dmarc.evaluate("pct.test", sampled, **fail, sample=lambda: 0.0)
    assert (r.policy, r.disposition) == ("reject", "quarantine")  # 6.6.4: next milder
    half = dmarc.DMARCRecord("quarantine", pct=50, domain="q.test")
    assert dmarc.evaluate("q.test", half, **fail, sample=lambda: 0.49).disposition == "quarantine"
    assert dmarc.evaluate("q.test", half, **fail, sample=lambda: 0.5).disposition == "none"


@pytest_twisted.ensureDeferred
async def test_lookup_from_domain_then_organizational_domain(auth_zones):  # noqa: F811
    dns = auth_zones.dns()
    record = await in_thread(dmarc.lookup_policy, "example.test", dns)
    assert (record.policy, record.domain) == ("reject", "example.test")
    record = await in_thread(dmarc.lookup_policy, "deep.sub.parent.test", dns)
    assert (record.policy, record.subdomain_policy, record.domain) == (
        "none",
        "reject",
        "parent.test",
    )
    assert await in_thread(dmarc.lookup_policy, "none.test", dns) is None
    record = await in_thread(dmarc.lookup_policy, "pct.test", dns)
    assert record.pct == 0


@pytest_twisted.ensureDeferred
async def test_lookup_failure_is_temporary(auth_zones):  # noqa: F811
    dns = auth_zones.dns()
    with pytest.raises(DNSTemporaryError):
        await in_thread(dmarc.lookup_policy, "a.servfail.test", dns)
    record, error = await in_thread(dmarc.check_dmarc, "a.servfail.test", dns)
    assert record is None and "servfail.test" in error
