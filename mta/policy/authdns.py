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

Answers are cached for their TTL (dnspython's thread-safe LRU cache, negative
answers included): a receiving MX asks for the same SPF, DKIM key and DMARC records
of its regular senders all day, and without a cache every message paid three to
five round trips to the resolver, which cost more than the checks themselves.

Every call blocks: call them on a thread pool, never on the reactor.
"""

from __future__ import annotations

import dns.exception
import dns.name
import dns.resolver


class DNSTemporaryError(Exception):
    """The DNS did not give an answer this time (timeout, SERVFAIL, network)."""


class AuthDNS:
    """Blocking lookups through one dnspython `resolver` (shared by threads)."""

    def __init__(self, resolver: dns.resolver.Resolver, *, cache_size: int = 10_000):
        if cache_size and resolver.cache is None:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        self.resolver = resolver

    def resolve(self, name: str, qtype: str, lifetime: float | None = None):
        """The answer's rdata list ([] for NXDOMAIN or no records of `qtype`)."""
        kwargs = {"search": False}
        if lifetime is not None:
            kwargs["lifetime"] = min(lifetime, self.resolver.lifetime)
        try:
            return list(self.resolver.resolve(name, qtype, **kwargs))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.name.NameTooLong:
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as e:
            raise DNSTemporaryError(f"{name} {qtype}: {_describe(e)}") from e
        except dns.exception.DNSException as e:
            raise DNSTemporaryError(f"{name} {qtype}: {_describe(e)}") from e

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


def _describe(e: Exception) -> str:
    if isinstance(e, dns.exception.Timeout):
        return "timeout"
    if isinstance(e, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or REFUSED)"
    return str(e) or type(e).__name__
