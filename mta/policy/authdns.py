"""DNS for the sender-authentication libraries (pyspf, dkimpy), from `[dns]`.

pyspf and dkimpy are blocking and resolve through dnspython; `AuthDNS` wraps one
dnspython `Resolver` built from the project's one resolver configuration
(`mta.dns.make_dnspython_resolver`: `[dns] nameservers`, `timeout`) and gives each
library the function shape it wants, with one rule for failures: an authoritative
"no such name" or "no such record" is an empty answer, anything else (timeout,
SERVFAIL, refused, network error) raises `DNSTemporaryError`, which the checks report
as `temperror` (RFC 7208 2.6.6, RFC 8601 2.7.1).

- `txt(name)`: the TXT strings of `name` (DMARC records, DKIM keys);
- `dkim_dnsfunc`: dkimpy's `dnsfunc(name: bytes, timeout) -> bytes | None`;
- `spf_lookup`: pyspf's `DNSLookup(name, qtype, strict, timeout)`.  pyspf calls a
  module global, so `mta.policy.spf` installs a per-thread dispatcher once instead
  of replacing it for everyone.

Answers are cached for their TTL, negative answers for their SOA's negative TTL
(RFC 2308): a receiving MX asks for the same SPF, DKIM key and DMARC records of its
regular senders all day, and without a cache every message paid three to five round
trips to the resolver, which cost more than the checks themselves.  The cache is a
plain dict in front of dnspython's (which stays, for what this one cannot keep):
a hit in dnspython's still builds a resolution (name parsing, search list) that
cost more per message under load than SPF's own evaluation.

Every call blocks: call them on a thread pool, never on the reactor; except inside
`run_cached(f, ...)`, where an answer the cache does not hold is not asked for:
`f` is abandoned (`NotCached`) and `run_cached` says so, so that the caller runs it
on a thread instead.  That is how the checks of a small message whose senders'
records are cached run on the reactor: for them a hop to a thread and back cost
more than the checks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver


class DNSTemporaryError(Exception):
    """The DNS did not give an answer this time (timeout, SERVFAIL, network)."""


class NotCached(BaseException):
    """Inside `AuthDNS.run_cached`: the answer is not in the cache.  A BaseException,
    so that the libraries' own ``except Exception`` lets it through; `run_cached`
    notices a swallowed one too."""


class AuthDNS:
    """Blocking lookups through one dnspython `resolver` (shared by threads)."""

    def __init__(
        self,
        resolver: dns.resolver.Resolver,
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ):
        if cache_size and resolver.cache is None:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        self.resolver = resolver
        self._clock = clock
        self._size = cache_size
        self._answers: dict[tuple[str, str], tuple[float, tuple]] = {}
        self._lock = threading.Lock()
        # .cached_only, .missed: see run_cached; .until: see fresh_until
        self._local = threading.local()

    def run_cached(self, f: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """(True, `f(*args)`) when `f` needed no DNS answer the cache does not hold;
        (False, None) when it did (then nothing was asked of the DNS and the caller
        runs `f` again where it may block).  `f`'s own exceptions propagate."""
        local = self._local
        local.cached_only, local.missed = True, False
        try:
            result = f(*args)
        except NotCached:
            return False, None
        finally:
            local.cached_only = False
        if local.missed:  # a library swallowed the NotCached: its result is not the real one
            return False, None
        return True, result

    def now(self) -> float:
        return self._clock()

    def fresh_until(self, f: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """(`f(*args)`, until when every DNS answer `f` used stays valid): the time
        the first of them expires; 0 when one of them was not kept (no records of
        that type, no negative TTL) or `f` used none, so that its result is not
        reused.  Calls nest inside `run_cached`."""
        local = self._local
        outer = getattr(local, "until", None)
        local.until = float("inf")
        try:
            result = f(*args)
            until = local.until
        finally:
            local.until = outer
        if outer is not None:  # the enclosing call used these answers too
            local.until = min(outer, until)
        return result, (0.0 if until == float("inf") else until)

    def _used(self, until: float) -> None:
        local = self._local
        current = getattr(local, "until", None)
        if current is not None and until < current:
            local.until = until

    def resolve(self, name: str, qtype: str, lifetime: float | None = None) -> list:
        """The answer's rdata list ([] for NXDOMAIN or no records of `qtype`)."""
        key = (name, qtype)
        hit = self._answers.get(key)
        if hit is not None and hit[0] > self._clock():
            self._used(hit[0])
            return list(hit[1])
        if getattr(self._local, "cached_only", False):
            self._local.missed = True
            raise NotCached(name, qtype)
        kwargs = {"search": False, "raise_on_no_answer": False}
        if lifetime is not None:
            kwargs["lifetime"] = min(lifetime, self.resolver.lifetime)
        try:
            answer = self.resolver.resolve(name, qtype, **kwargs)
        except dns.resolver.NXDOMAIN as e:
            self._used(self._keep(key, (), _negative_ttl(e)))
            return []
        except (dns.resolver.NoAnswer, dns.name.NameTooLong):
            self._used(0.0)
            return []
        except dns.exception.DNSException as e:  # timeout, SERVFAIL, refused, ...
            self._used(0.0)
            raise DNSTemporaryError(f"{name} {qtype}: {_describe(e)}") from e
        rdata = tuple(answer) if answer.rrset is not None else ()
        self._used(self._keep(key, rdata, answer.expiration - time.time()))
        return list(rdata)

    def _keep(self, key: tuple[str, str], rdata: tuple, ttl: float) -> float:
        """Cache the answer for `ttl` seconds; until when (0: not kept)."""
        if ttl <= 0 or not self._size:
            return 0.0
        with self._lock:
            if len(self._answers) >= self._size:
                now = self._clock()
                for old in [k for k, (expires, _) in self._answers.items() if expires <= now]:
                    del self._answers[old]
                while len(self._answers) >= self._size:  # still full: the oldest go
                    del self._answers[next(iter(self._answers))]
            until = self._clock() + ttl
            self._answers[key] = (until, rdata)
        return until

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record of `name`, its strings joined."""
        return [b"".join(r.strings) for r in self.resolve(name, "TXT")]

    def dkim_dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's key lookup: the first TXT record of `name`, or None."""
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        records = self.txt(text)
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str, strict=True, timeout: float = 20) -> list:
        """pyspf's DNSLookup contract: [((name, qtype), value), ...]."""
        import spf

        try:
            answers = self.resolve(name, qtype, lifetime=timeout)
        except DNSTemporaryError as e:
            raise spf.TempError(f"DNS {e}") from e
        out = []
        for rdata in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
            elif qtype == "CNAME":
                out.append(((name, qtype), rdata.target.to_text(True)))
        return out


def _negative_ttl(e: dns.resolver.NXDOMAIN) -> float:
    """How long an NXDOMAIN may be kept: min(SOA TTL, SOA MINIMUM) of the authority
    section (RFC 2308 5), 0 when the answer carried no SOA."""
    try:
        responses = e.responses()
    except Exception:  # an NXDOMAIN raised without responses
        return 0
    for response in responses.values():
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(rrset.ttl, rrset[0].minimum)
    return 0


def _describe(e: Exception) -> str:
    if isinstance(e, dns.exception.Timeout):
        return "timeout"
    if isinstance(e, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or REFUSED)"
    return str(e) or type(e).__name__
