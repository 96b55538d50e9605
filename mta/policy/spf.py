"""SPF (RFC 7208) with pyspf, resolving through `AuthDNS` (the `[dns]` resolver).

`check_spf(dns, ip, sender, helo, ...)` is blocking (run it on a thread pool): the
MAIL FROM identity, or the HELO identity when the reverse path is null
(`postmaster@<helo>`, RFC 7208 2.3); pyspf enforces the lookup limits (10 DNS
mechanisms, 2 void lookups: more is `permerror`, 4.6.4) and `querytime` bounds
the whole evaluation.  The result carries pyspf's own `Received-SPF` header
(RFC 7208 9.1).

pyspf resolves through a module global (`spf.DNSLookup`).  Replacing it with our
resolver for everyone would change DNS for any other user of pyspf in the process,
so `_install` replaces it once with a dispatcher that uses the lookup this thread
set (`_local.lookup`) and falls back to pyspf's own otherwise.  (Ours never calls
dnspython's deprecated `dns.resolver.query`, so pyspf's DeprecationWarning does not
come up and no warning filter, a process-wide setting, needs changing.)
"""

from __future__ import annotations

import threading

import attrs

from mta.policy.authdns import AuthDNS

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

_local = threading.local()
_install_lock = threading.Lock()
_installed = False


@attrs.frozen
class SPFResult:
    """One SPF evaluation: `result` is one of RESULTS."""

    result: str
    explanation: str = ""
    identity: str = "mailfrom"  # "mailfrom", or "helo" for a null reverse path
    domain: str = ""  # the domain whose policy was evaluated
    sender: str = ""  # the identity checked (postmaster@<helo> for "helo")
    received_spf: bytes = b""  # the Received-SPF header field, CRLF-terminated

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def _install():
    global _installed
    import spf

    with _install_lock:
        if _installed:
            return spf
        original = spf.DNSLookup

        def dispatch(name, qtype, strict=True, timeout=20):
            lookup = getattr(_local, "lookup", None)
            if lookup is None:
                return original(name, qtype, strict, timeout)
            return lookup(name, qtype, strict, timeout)

        spf.DNSLookup = dispatch
        _installed = True
    return spf


def check_spf(
    dns: AuthDNS,
    ip: str,
    sender: str,
    helo: str,
    *,
    receiver: str,
    querytime: float = 20.0,
) -> SPFResult:
    """Blocking: the SPF result for a client at `ip` saying MAIL FROM:<`sender`>
    ("" for the null path) after HELO `helo`; `receiver` (our host name) goes into
    the Received-SPF header."""
    spf = _install()
    helo = helo or ""
    if not sender and not helo:
        return SPFResult("none", "no identity to check", "helo")
    _local.lookup = dns.spf_lookup
    try:
        q = spf.query(
            i=ip, s=sender, h=helo, receiver=receiver, querytime=querytime, timeout=querytime
        )
        result, _code, explanation = q.check()
        try:
            header = "Received-SPF: " + q.get_header(result, receiver)
        except Exception:  # pyspf builds it from what it found: never fatal
            header = f"Received-SPF: {result.capitalize()}"
    finally:
        _local.lookup = None
    if result not in RESULTS:
        result = "permerror" if result in ("unknown", "error") else result
    domain = q.o or ""
    return SPFResult(
        result,
        str(explanation or ""),
        q.ident,
        domain,
        q.s,
        _fold(header).encode("utf-8", "replace") + b"\r\n",
    )


def _fold(header: str) -> str:
    """Fold a long Received-SPF at the spaces between its parts (RFC 5322 2.2.3)."""
    header = " ".join(header.split())
    lines, line = [], ""
    for word in header.split(" "):
        if line and len(line) + 1 + len(word) > 76:
            lines.append(line)
            line = "\t" + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n".join(lines)
