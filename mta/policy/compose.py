"""The policy stage assembled from the configuration: which checks run, in what
order, with what timeouts and failure modes.

The composition root (`mta.app`) hands over what the checks need from other stages
(the user directory, the sender policy, a thread pool); everything else comes from
`[checks]`, `[limits]` and `[dns]`.
"""

from __future__ import annotations

from functools import partial

from twisted.internet import threads

from mta.dns import make_resolver
from mta.policy.attachments import AttachmentCheck
from mta.policy.clamd import ClamdClient, VirusCheck
from mta.policy.daemons import daemon_endpoint
from mta.policy.dnsbl import DNSBLCheck
from mta.policy.pipeline import PolicyPipeline
from mta.policy.quota import QuotaCheck
from mta.policy.ratelimit import RateLimitCheck, RateLimiter, SharedRateLimiter
from mta.policy.relay import RelayCheck
from mta.policy.sender import SenderCheck
from mta.policy.senderauth import sender_auth_check
from mta.policy.spamd import SpamCheck, SpamdClient

# Checks that guard the relay rule and abuse limits: never skipped because they failed.
_ALWAYS_FAIL_CLOSED = ("relay", "sender", "rate-ip", "rate-user", "clamd")


def policy_pipeline(
    config, clock, directory, sender_policy, pool=None, auth_pool=None, rate_buckets=None
) -> PolicyPipeline:
    """The policy checks, in order: DNS block lists at CONNECT, rate limits and the
    sender rule at MAIL, then the relay rule (recipient resolution) and quotas at
    RCPT, then quotas, clamd, spamd and the attachment rules at the end of DATA;
    timeouts and failure mode from `[checks]` (the virus scan always fails closed).
    Their blocking work (reading the message, MIME and zip parsing) runs on `pool`,
    bounded and their own, so a flood of big attachments queues there and not in
    front of everything else on the reactor's default pool.  SPF, DKIM, ARC and
    DMARC (`[checks] spf/dkim/dmarc`, at MAIL and DATA) block on DNS: they get
    `auth_pool`, so a slow DNS does not hold up the scanners' reads.  With
    `rate_buckets` (`RateBuckets`: the database is shared by several nodes) the rate
    limits count in the database instead of in this process."""
    checks = []
    if config.checks.dnsbl:
        checks.append(
            DNSBLCheck(
                make_resolver(config.dns, clock),
                config.checks.dnsbl,
                action=config.checks.dnsbl_action,
                allow_zones=config.checks.dnswl,
                relay_networks=config.relay_networks,
            )
        )
    limits = config.limits
    for per, limit in (
        ("ip", limits.messages_per_ip_per_minute),
        ("user", limits.messages_per_user_per_minute),
    ):
        if limit:
            if rate_buckets is None:
                limiter = RateLimiter(clock, limit)
            else:
                limiter = SharedRateLimiter(rate_buckets, limit, per)
            checks.append(RateLimitCheck(limiter, per))
    checks.append(SenderCheck(sender_policy))
    checks.append(RelayCheck(config.local_domains, config.relay_networks, directory))
    checks.append(QuotaCheck(directory))
    scan = config.checks
    if (scan.spf, scan.dkim, scan.dmarc) != ("off", "off", "off"):
        checks.append(sender_auth_check(config, clock, auth_pool or pool or clock.getThreadPool()))
    if scan.clamd:
        clamd = ClamdClient(daemon_endpoint(clock, scan.clamd), clock, pool=pool)
        checks.append(VirusCheck(clamd, scan.virus_action, clock))
    if scan.spamd:
        spamd = SpamdClient(daemon_endpoint(clock, scan.spamd))
        checks.append(
            SpamCheck(
                spamd, clock, scan.spam_threshold, scan.spam_action, scan.spam_max_size, pool=pool
            )
        )
    if config.checks.blocked_attachments:
        run = None if pool is None else partial(threads.deferToThreadPool, clock, pool)
        checks.append(
            AttachmentCheck(
                config.checks.blocked_attachments,
                action=config.checks.attachment_action,
                run_blocking=run,
            )
        )
    return PolicyPipeline(
        checks,
        clock,
        timeout=config.checks.timeout,
        fail_open=config.checks.fail == "open",
        fail_open_by_check=dict.fromkeys(_ALWAYS_FAIL_CLOSED, False),
    )
