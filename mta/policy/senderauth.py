"""`SenderAuthCheck`: SPF at MAIL FROM, then DKIM, ARC and DMARC at the end of DATA.

The checks of `[checks] spf`, `dkim` and `dmarc` (each off, tag or enforce) for
mail from outside: sessions that did not authenticate, from clients not in
`relay_networks` (authenticated submission and trusted relays skip them).

- MAIL: SPF for the MAIL FROM identity (the HELO identity for `<>`).  With
  `spf = "enforce"` and DMARC off, `fail` is `550 5.7.23` right there; `temperror`
  is `451 4.7.24` with `[checks] fail = "closed"` and goes on as
  `spf=temperror` with `fail = "open"`.  The result waits for DATA in a small table
  keyed by session and sender (evicted oldest first; recomputed if gone).  A verdict
  is reused for the same client address, sender and HELO while every DNS answer it
  rests on is still valid (`AuthDNS.fresh_until`; never a temperror): a regular
  sender's MTA gets the verdict pyspf gave, without evaluating its record again.
- DATA: the header section is read from the spool (the whole message only when
  it has a DKIM signature or an ARC seal to check), then DKIM (every signature),
  ARC and the DMARC record lookups run one after the other in one call: right here
  on the reactor for a small message in memory whose DNS answers are all cached
  (`AuthDNS.run_cached`; a hop to a thread and back cost more than these checks),
  else on the bounded `pool`; DMARC then combines SPF, DKIM and the record.  SPF at
  MAIL likewise.  With `dmarc = "enforce"`, `p=reject`
  answers `550 5.7.1` and `p=quarantine` quarantines (after `pct=` sampling); with
  DMARC on, an SPF `fail` under `spf = "enforce"` is refused here when the From
  domain has no DMARC policy.  DKIM alone never refuses: `dkim = "tag"` or
  `"enforce"` reports `dkim=` results, and DMARC always uses the signatures.
- Every checked message gets one Authentication-Results (authserv-id our host
  name) and, with SPF on, Received-SPF, at the top; an Authentication-Results that
  arrived claiming our host name is removed (`Verdict.remove`).

The results of a message are logged in one `event="checks"` line with the queue
id (`results`: each check's result and detail; an SPF refusal at MAIL is an
`event="check"` line of its own); the metrics `mta_check_results_total{check,result}`
and `mta_check_duration_seconds{check}` count them.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterable

from twisted.internet import threads
from zope.interface import implementer

from mta.dns import make_dnspython_resolver
from mta.envelope import Reply
from mta.headers import field_present
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy import arc as arcmod
from mta.policy import dkimverify, dmarc
from mta.policy.authdns import AuthDNS
from mta.policy.authresults import authentication_results, forged_results, from_domains
from mta.policy.dnsbl import client_ip
from mta.policy.spf import SPFResult, check_spf
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict

log = Logger()

MODES = ("off", "tag", "enforce")
SPF_REJECTED = Reply(550, "5.7.23", "SPF validation failed: {domain} does not permit this host")
SPF_TEMPFAIL = Reply(451, "4.7.24", "SPF check failed temporarily (DNS), try again later")
DMARC_REJECTED = Reply(550, "5.7.1", "Rejected by the DMARC policy of {domain}")
DMARC_TEMPFAIL = Reply(451, "4.7.1", "DMARC check failed temporarily (DNS), try again later")
_SPF_TABLE = 4096
HEAD_LIMIT = 1024 * 1024  # the most of a header section looked at
INLINE_SIZE = 128 * 1024  # the largest message checked on the reactor (cached DNS)
INLINE_SIGNATURES = 3  # the most DKIM signatures + ARC seals checked there


class SenderAuthCheck:
    """See the module docstring.  `pool` is a bounded thread pool for the blocking
    libraries; `dns` the `[dns]` resolver; `sample` feeds DMARC's pct=."""

    name = "sender-auth"

    def __init__(
        self,
        dns: AuthDNS,
        reactor,
        pool,
        hostname: str,
        *,
        spf: str = "off",
        dkim: str = "off",
        dmarc: str = "off",
        relay_networks: Iterable = (),
        fail_open: bool = False,
        querytime: float = 20.0,
        sample: Callable[[], float] = random.random,
    ):
        for key, mode in (("spf", spf), ("dkim", dkim), ("dmarc", dmarc)):
            if mode not in MODES:
                raise ValueError(f"checks.{key} must be one of {', '.join(MODES)}")
        self.dns = dns
        self.reactor = reactor
        self.pool = pool
        self.hostname = hostname
        self.spf, self.dkim, self.dmarc = spf, dkim, dmarc
        self.relay_networks = tuple(relay_networks)
        self.fail_open = fail_open
        self.querytime = querytime
        self.sample = sample
        self.phases = ((Phase.MAIL,) if spf != "off" else ()) + (Phase.DATA,)
        self._forged = (forged_results(hostname),)
        self._spf_results: collections.OrderedDict = collections.OrderedDict()
        self._spf_verdicts: collections.OrderedDict = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"<SenderAuthCheck spf={self.spf} dkim={self.dkim} dmarc={self.dmarc}>"

    def applies(self, context: PolicyContext) -> bool:
        """Mail from outside: not authenticated, not from relay_networks."""
        if context.authenticated_as is not None:
            return False
        ip = client_ip(context.client_address)
        if ip is None:
            return True
        return not any(ip.version == n.version and ip in n for n in self.relay_networks)

    def _run(self, f, *args, **kwargs):
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    def check(self, phase: Phase, context: PolicyContext):
        if phase is Phase.MAIL:
            if self.spf == "off" or not self.applies(context):
                return Verdict.ACCEPT
            return self._mail(context)
        if context.body is None:
            return Verdict.CONTINUE
        return self._data(context)

    # -- MAIL ----------------------------------------------------------------------

    def _spf_key(self, context: PolicyContext) -> tuple:
        return (context.session_id, context.client_address, str(context.sender or ""))

    def _spf_args(self, context: PolicyContext) -> tuple:
        """`check_spf`'s arguments after `dns`: (ip, sender, helo, receiver, querytime)."""
        ip = client_ip(context.client_address)
        return (
            str(ip) if ip is not None else context.client_address,
            str(context.sender) if context.sender else "",
            context.helo or "",
            self.hostname,
            self.querytime,
        )

    def _mail(self, context: PolicyContext):
        started = self.reactor.seconds()
        args = self._spf_args(context)
        verdict_key = args[:3]  # client address, sender, HELO
        known = self._spf_verdicts.get(verdict_key)
        if known is not None and known[0] > self.dns.now():
            return self._after_spf(context, known[1], self.reactor.seconds() - started)
        done, found = self.dns.run_cached(_spf_fresh, self.dns, args)
        if done:
            result = self._remember(verdict_key, found)
            return self._after_spf(context, result, self.reactor.seconds() - started)
        d = self._run(_spf_fresh, self.dns, args)
        d.addCallback(lambda found: self._remember(verdict_key, found))
        return d.addCallback(
            lambda result: self._after_spf(context, result, self.reactor.seconds() - started)
        )

    def _remember(self, key: tuple, found: tuple) -> SPFResult:
        """Keep an SPF verdict while every DNS answer it rests on is valid: the same
        client, sender and HELO get the same verdict until one of them expires
        (never a temperror, nor one resting on an answer that was not kept)."""
        result, until = found
        if result.result != "temperror" and until > self.dns.now():
            _keep(self._spf_verdicts, key, (until, result))
        return result

    def _after_spf(self, context: PolicyContext, result: SPFResult, duration: float) -> Verdict:
        key = self._spf_key(context)
        _keep(self._spf_results, key, (result, duration))
        refusal = self._spf_refusal(result, at_mail=True)
        if refusal is not None:
            self._spf_results.pop(key, None)
            self._log("spf", result.result, None, duration, context, result.explanation, refusal)
        return refusal or Verdict.ACCEPT

    def _spf_refusal(self, result: SPFResult, *, at_mail: bool) -> Verdict | None:
        if result.result == "temperror" and not self.fail_open:
            return Verdict.tempfail(SPF_TEMPFAIL, f"SPF temperror: {result.explanation}")
        if result.result == "fail" and self.spf == "enforce" and (self.dmarc == "off") == at_mail:
            reply = SPF_REJECTED
            reply = Reply(
                reply.code,
                reply.enhanced,
                reply.text.format(domain=result.domain or "the sender's domain"),
            )
            return Verdict.reject(reply, f"SPF fail for {result.sender}")
        return None

    # -- end of DATA ------------------------------------------------------------------

    def _data(self, context: PolicyContext):
        """The verdict at once when the message is small, in memory, and every DNS
        answer it needs is cached (the checks run right here: cheaper than a hop to
        a thread and back); else a Deferred of it, from the pool."""
        started = self.reactor.seconds()
        body = context.body
        head = _head_if_inline(body)  # read once here when the checks may run here
        inline = head is not None
        if not self.applies(context):
            if inline:
                return self._unchecked(head)
            return self._run(body.header_block, HEAD_LIMIT).addCallback(self._unchecked)
        # DMARC needs the signatures whether or not dkim= is reported.
        wanted = self.dkim != "off" or self.dmarc != "off"
        spf_entry = self._spf_results.pop(self._spf_key(context), None)
        spf_args = self._spf_args(context) if self.spf != "off" and spf_entry is None else None
        args = (body, self.dns, wanted, self.dmarc != "off", spf_args)
        if inline:
            done, found = self.dns.run_cached(_authenticate, *args, head)
            if done:
                return self._judge(context, started, spf_entry, found)
        # One hop to the pool for all of it: reading the message, the signatures, the
        # DMARC records (and SPF when MAIL's result is gone).
        d = self._run(_authenticate, *args)
        return d.addCallback(lambda found: self._judge(context, started, spf_entry, found))

    def _unchecked(self, head: bytes) -> Verdict:
        remove = self._forged if field_present(head, self._forged) else ()
        return Verdict.continue_(remove=remove)

    def _judge(self, context, started, spf_entry, found) -> Verdict:
        head, signatures, arc_result, domains, records, spf_late = found
        if spf_late is not None:
            spf_entry = (spf_late, self.reactor.seconds() - started)
        duration = self.reactor.seconds() - started
        spf_result = spf_entry[0] if spf_entry else None
        dmarc_result = self._dmarc(domains, records, spf_result, signatures)
        return self._verdict(
            context, head, spf_entry, signatures, arc_result, dmarc_result, duration
        )

    def _dmarc(self, domains, records, spf_result, signatures):
        if self.dmarc == "off":
            return None
        if not domains:
            return dmarc.DMARCResult("none", reason="no From domain")
        spf_domain = spf_result.domain if spf_result and spf_result.passed else None
        passing = [s.domain for s in signatures if s.passed]
        results = []
        for domain, (record, error) in zip(domains, records):
            if error:
                results.append(dmarc.DMARCResult("temperror", domain, reason=error))
                continue
            result = dmarc.evaluate(domain, record, spf_domain, passing, sample=self.sample)
            if result.result == "fail" and any(
                s.result == "temperror" and dmarc.aligned(s.domain, domain, "r") for s in signatures
            ):
                result = dmarc.DMARCResult(
                    "temperror", domain, result.policy, "none", "DKIM key lookup failed"
                )
            results.append(result)
        # Several From domains: the one that asks most of us speaks.
        order = {"reject": 3, "quarantine": 2, "none": 1}
        rank = {"fail": 4, "temperror": 3, "permerror": 2, "none": 1, "pass": 0}
        return max(results, key=lambda r: (rank[r.result], order.get(r.disposition, 0)))

    def _verdict(self, context, head, spf_entry, signatures, arc_result, dmarc_result, duration):
        spf_result = spf_entry[0] if spf_entry else None
        headers = [
            authentication_results(
                self.hostname,
                spf_result,
                signatures if self.dkim != "off" else None,
                dmarc_result,
                arc_result,
            )
        ]
        if spf_result is not None and spf_result.received_spf:
            headers.append(spf_result.received_spf)
        remove = self._forged if field_present(head, self._forged) else ()
        verdict = self._decide(spf_result, dmarc_result)
        self._log_results(
            context, spf_entry, signatures, arc_result, dmarc_result, duration, verdict
        )
        if verdict.refuses:
            return verdict
        if verdict.action is Action.QUARANTINE:
            return Verdict.quarantine(verdict.reason, headers=tuple(headers), remove=remove)
        return Verdict.continue_(headers=tuple(headers), remove=remove)

    def _log_results(self, context, spf_entry, signatures, arc_result, dmarc, duration, verdict):
        """One line for the message (``event="checks"``): a line per check made four
        of the message's six log events, and logging was a tenth of the server's
        time with sender authentication on."""
        results = []
        if spf_entry is not None:
            spf_result, spf_duration = spf_entry
            results.append(_item("spf", spf_result.result, spf_result.explanation, spf_duration))
        if self.dkim != "off":
            for sig in signatures or (None,):
                detail = f"d={sig.domain} s={sig.selector} {sig.reason}".strip() if sig else ""
                results.append(_item("dkim", sig.result if sig else "none", detail or "unsigned"))
        if arc_result is not None:
            results.append(_item("arc", arc_result.result, arc_result.reason))
        if dmarc is not None:
            detail = f"{dmarc.from_domain} p={dmarc.policy or '-'} dis={dmarc.disposition}"
            results.append(_item("dmarc", dmarc.result, f"{detail} {dmarc.reason}".strip()))
        log.info(
            "{qid}: {summary} -> {action}",
            event="checks",
            qid=context.queue_id or "-",
            summary="; ".join(_summary(r) for r in results),
            results=results,
            session=context.session_id,
            client=context.client_address,
            duration=duration,
            action="reject" if verdict.refuses else verdict.action.value,
        )

    def _decide(self, spf_result, dmarc_result) -> Verdict:
        if dmarc_result is not None and self.dmarc == "enforce":
            if dmarc_result.result == "temperror" and not self.fail_open:
                return Verdict.tempfail(DMARC_TEMPFAIL, f"DMARC temperror: {dmarc_result.reason}")
            if dmarc_result.result == "fail":
                domain = dmarc_result.from_domain
                if dmarc_result.disposition == "reject":
                    reply = DMARC_REJECTED
                    text = reply.text.format(domain=domain)
                    return Verdict.reject(
                        Reply(reply.code, reply.enhanced, text), f"DMARC p=reject for {domain}"
                    )
                if dmarc_result.disposition == "quarantine":
                    return Verdict.quarantine(f"DMARC p=quarantine for {domain}")
        if (
            spf_result is not None
            and self.dmarc != "off"
            and (dmarc_result is None or dmarc_result.result in ("none", "permerror"))
        ):
            refusal = self._spf_refusal(spf_result, at_mail=False)
            if refusal is not None and refusal.action is Action.REJECT:
                return refusal
        return Verdict.CONTINUE

    def _log(self, check, result, qid, duration, context, detail, verdict=None, action=None):
        if action is None:
            action = "accept" if verdict is None else verdict.action.value
        log.info(
            "{qid}: {check}: {result} ({detail}) -> {action}",
            event="check",
            check=check,
            result=result,
            qid=qid or "-",
            session=context.session_id,
            client=context.client_address,
            duration=duration,
            detail=detail,
            action=action,
        )


implementer(IPolicyCheck)(SenderAuthCheck)


def sender_auth_check(config, reactor, pool) -> SenderAuthCheck:
    """The check as `config` (`[checks]`, `[dns]`, `hostname`, `relay_networks`)
    says, on the bounded thread `pool`."""
    scan = config.checks
    return SenderAuthCheck(
        AuthDNS(make_dnspython_resolver(config.dns)),
        reactor,
        pool,
        config.hostname,
        spf=scan.spf,
        dkim=scan.dkim,
        dmarc=scan.dmarc,
        relay_networks=config.relay_networks,
        fail_open=scan.fail == "open",
        # pyspf's own bound, inside the pipeline's: a slow SPF evaluation ends as
        # spf=temperror (and our fail rule) rather than as a timed-out check
        querytime=scan.timeout * 0.8,
    )


def _item(check: str, result: str, detail: str, duration: float | None = None) -> dict:
    item = {"check": check, "result": result, "detail": detail}
    if duration is not None:
        item["duration"] = duration
    return item


def _summary(item: dict) -> str:
    detail = item["detail"]
    return f"{item['check']}={item['result']}" + (f" ({detail})" if detail else "")


def _keep(table: collections.OrderedDict, key, value) -> None:
    """Put `value` in `table` as its newest entry, the oldest going past _SPF_TABLE."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > _SPF_TABLE:
        table.popitem(last=False)


def _spf(dns: AuthDNS, args: tuple) -> SPFResult:
    ip, sender, helo, receiver, querytime = args
    return check_spf(dns, ip, sender, helo, receiver=receiver, querytime=querytime)


def _spf_fresh(dns: AuthDNS, args: tuple) -> tuple[SPFResult, float]:
    """The SPF result, and until when the DNS answers it rests on stay valid."""
    return dns.fresh_until(_spf, dns, args)


def _authenticate(body, dns: AuthDNS, signatures: bool, dmarc_on: bool, spf_args, head=None):
    """Thread: everything end of DATA needs that blocks, one after the other:
    (header section, DKIM results, ARC result, From domains, their DMARC records,
    the SPF result when `spf_args` asks for it).  The whole message is read only
    when there is a signature or seal to check; `head`, when the caller read it."""
    head, message = _read_message(body, signatures, head)
    if message is not None:
        results = dkimverify.verify_signatures(message, dns)
        arc_result = arcmod.verify_chain(message, dns)
    else:
        results, arc_result = (), (arcmod.ARCResult("none") if signatures else None)
    domains = from_domains(head) if dmarc_on else []
    records = [dmarc.check_dmarc(d, dns) for d in domains]
    spf_result = _spf(dns, spf_args) if spf_args is not None else None
    return head, results, arc_result, domains, records, spf_result


def _signatures_named(head: bytes) -> int:
    """How often the header section names DKIM-Signature or ARC-Seal (a scan in C; a
    mention elsewhere than a field name costs only reading the message, whose
    verification then finds no signature, as if it had not been read)."""
    lowered = head.lower()
    return lowered.count(b"dkim-signature") + lowered.count(b"arc-seal")


def _head_if_inline(body) -> bytes | None:
    """The header section of `body` when it may be checked on the reactor (in memory,
    at most INLINE_SIZE bytes, at most INLINE_SIGNATURES signatures and seals: each
    costs a body hash, and a message built to cost many is checked on a thread);
    else None."""
    if not getattr(body, "in_memory", False) or body.size > INLINE_SIZE:
        return None
    head = body.header_block(HEAD_LIMIT)
    return head if _signatures_named(head) <= INLINE_SIGNATURES else None


def _read_message(body, signatures: bool, head=None) -> tuple[bytes, bytes | None]:
    """Thread: (the header section, the whole message or None).  The DKIM and ARC
    hashes need all of it, but only when there is a signature or seal to check
    (`signatures`: they are wanted), which the header section tells."""
    if head is None:
        head = body.header_block(HEAD_LIMIT)
    if not signatures or not _signatures_named(head):
        return head, None
    chunks = body.chunks(262144)
    try:
        return head, b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
