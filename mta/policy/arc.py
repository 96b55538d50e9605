"""ARC (RFC 8617): verify the chain a forwarder sealed, with dkimpy.

`verify_chain(message, dns)` is blocking (thread pool): the chain validation status
of the message as it arrived (`none` without ARC sets, `pass`, `fail`), how many
sets it has, and the domain that sealed the newest one, for `arc=` in our
Authentication-Results.  A DNS failure while fetching a sealer's key is
`temperror`, not a broken chain.

Sealing what we forward (`[checks] arc_seal`) happens on the delivery side with the
DKIM key; see README.rst for its state.
"""

from __future__ import annotations

import logging
import re

import attrs
import dkim

from mta.policy.authdns import AuthDNS, DNSTemporaryError

_quiet = logging.getLogger("mta.dkimpy.arc")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)
_DOMAIN = re.compile(rb"(?:^|;)\s*d\s*=\s*([^;\s]+)", re.IGNORECASE)


@attrs.frozen
class ARCResult:
    result: str  # none | pass | fail | temperror
    instances: int = 0
    sealer: str = ""  # d= of the newest ARC-Seal
    reason: str = ""


def verify_chain(message: bytes, dns: AuthDNS) -> ARCResult:
    """Blocking: the ARC chain validation of `message` (CRLF line endings)."""
    seals = _seals(message)
    if not seals:
        return ARCResult("none")
    instances = max(i for i, _ in seals)
    sealer = next((d for i, d in seals if i == instances), "")

    def dnsfunc(name, timeout=5):
        return dns.dkim_dnsfunc(name, timeout)

    try:
        cv, _results, reason = dkim.arc_verify(message, logger=_quiet, dnsfunc=dnsfunc)
    except DNSTemporaryError as e:
        return ARCResult("temperror", instances, sealer, f"key lookup failed: {e}")
    result = cv.decode("ascii") if isinstance(cv, bytes) else str(cv)
    return ARCResult(result.lower(), instances, sealer, str(reason or ""))


def _seals(message: bytes) -> list[tuple[int, str]]:
    """(instance, d=) of each ARC-Seal field in the header section."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    out = []
    for field in re.split(rb"\r\n(?![ \t])", head):
        name, sep, value = field.partition(b":")
        if not sep or name.strip().lower() != b"arc-seal":
            continue
        value = re.sub(rb"\r\n[ \t]", b" ", value)
        instance = _INSTANCE.search(value)
        domain = _DOMAIN.search(value)
        out.append(
            (
                int(instance.group(1)) if instance else 0,
                domain.group(1).decode("ascii", "replace") if domain else "",
            )
        )
    return out
