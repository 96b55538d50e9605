"""DMARC (RFC 7489): the From domain's policy, identifier alignment and disposition.

Our own code on publicsuffix2 rather than authheaders' DMARC: authheaders (0.15.2
in Debian 12 as in the newest release) treats a DNS failure while fetching the
record as "no record" (so an unreachable DNS would read as `dmarc=none` instead of
`temperror`) and leaves `pct=` unapplied.

- `lookup_policy(domain, dns)` (blocking, thread pool): the record at
  `_dmarc.<From domain>`, else at `_dmarc.<organizational domain>` (6.6.3);
- `evaluate(...)` (pure): aligned SPF or DKIM pass (strict: the same domain;
  relaxed: the same organizational domain, 3.1) decides pass or fail; a failure
  gets the policy (`p=`, or `sp=` when the record came from the organizational
  domain of a subdomain), sampled by `pct=` (6.6.4: a message outside the sample
  gets the next milder policy).

The organizational domain comes from the Public Suffix List (publicsuffix2's
bundled copy); an unlisted top-level domain is a public suffix by the list's
default rule `*`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable

import attrs

from mta.policy.authdns import AuthDNS, DNSTemporaryError

POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


@attrs.frozen
class DMARCRecord:
    policy: str  # p=
    subdomain_policy: str | None = None  # sp=
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    domain: str = ""  # where the record was found (From or organizational domain)


@attrs.frozen
class DMARCResult:
    result: str  # pass | fail | none | temperror | permerror
    from_domain: str = ""
    policy: str = ""  # the policy that applies to this From domain ("" without one)
    disposition: str = "none"  # what the policy asks for this message, after pct=
    reason: str = ""
    record: DMARCRecord | None = None


@functools.lru_cache(maxsize=1)
def _psl():
    from publicsuffix2 import PublicSuffixList

    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The registered domain of `domain` (RFC 7489 3.2), lower case."""
    domain = domain.lower().rstrip(".")
    suffix = _psl().get_tld(domain) or domain.rpartition(".")[2]
    labels = domain.split(".")
    keep = len(suffix.split(".")) + 1
    return domain if len(labels) <= keep else ".".join(labels[-keep:])


def parse_record(text: str, domain: str = "") -> DMARCRecord | None:
    """The record in TXT `text`, or None when it is not a usable DMARC record."""
    tags = {}
    for part in text.split(";"):
        key, sep, value = part.partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if "rua" not in tags:
            return None
        policy = "none"  # 6.6.3: an invalid p= with rua= is p=none
    sp = tags.get("sp", "").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DMARCRecord(
        policy,
        sp if sp in POLICIES else None,
        min(100, max(0, pct)),
        "s" if tags.get("adkim", "r").lower() == "s" else "r",
        "s" if tags.get("aspf", "r").lower() == "s" else "r",
        domain,
    )


def _record_at(domain: str, dns: AuthDNS) -> DMARCRecord | None:
    texts = [t.decode("utf-8", "replace") for t in dns.txt(f"_dmarc.{domain}")]
    records = [t for t in texts if t.replace(" ", "").upper().startswith("V=DMARC1")]
    if len(records) != 1:
        return None  # 6.6.3: none, or more than one, is no policy
    return parse_record(records[0], domain)


def lookup_policy(from_domain: str, dns: AuthDNS) -> DMARCRecord | None:
    """Blocking: the DMARC record that governs `from_domain`, or None.  Raises
    DNSTemporaryError when the DNS did not answer."""
    from_domain = from_domain.lower().rstrip(".")
    record = _record_at(from_domain, dns)
    if record is None:
        org = organizational_domain(from_domain)
        if org != from_domain:
            record = _record_at(org, dns)
    return record


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier = identifier.lower().rstrip(".")
    from_domain = from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def evaluate(
    from_domain: str,
    record: DMARCRecord | None,
    spf_pass_domain: str | None,
    dkim_pass_domains: Iterable[str],
    *,
    sample: Callable[[], float] = random.random,
) -> DMARCResult:
    """The DMARC result for `from_domain` given its `record` (None: no policy), the
    domain SPF passed for (None when SPF did not pass) and the d= of every DKIM
    signature that verified.  `sample()` in [0, 1) decides the pct= sampling."""
    from_domain = from_domain.lower().rstrip(".")
    if record is None:
        return DMARCResult("none", from_domain, reason="no DMARC record")
    policy = record.policy
    if record.domain != from_domain and record.subdomain_policy:
        policy = record.subdomain_policy
    if spf_pass_domain and aligned(spf_pass_domain, from_domain, record.aspf):
        return DMARCResult("pass", from_domain, policy, "none", "SPF aligned", record)
    for d in dkim_pass_domains:
        if aligned(d, from_domain, record.adkim):
            return DMARCResult("pass", from_domain, policy, "none", f"DKIM d={d} aligned", record)
    disposition = policy
    reason = "no aligned SPF or DKIM pass"
    if policy != "none" and record.pct < 100 and sample() * 100 >= record.pct:
        disposition = _MILDER[policy]
        reason += f"; outside pct={record.pct}"
    return DMARCResult("fail", from_domain, policy, disposition, reason, record)


def check_dmarc(from_domain: str, dns: AuthDNS) -> tuple[DMARCRecord | None, str]:
    """Blocking: (record, "") or (None, why) when the lookup failed temporarily."""
    try:
        return lookup_policy(from_domain, dns), ""
    except DNSTemporaryError as e:
        return None, str(e)
