"""DKIM verification (RFC 6376) of every signature of a message, with dkimpy.

`verify_signatures(message, dns)` is blocking (run it on a thread pool): one
`DKIMResult` per DKIM-Signature field, top to bottom, RSA and Ed25519 alike
(dkimpy verifies Ed25519 with PyNaCl).  Results follow RFC 8601 2.7.1:

- pass: the signature verifies;
- fail: it does not (bad body hash, bad signature): the message is then treated as
  if it had no such signature (RFC 6376 6.1), which is what DMARC does with it;
- permerror: the signature cannot be checked at all (malformed field, no key
  published, key unusable);
- temperror: the key could not be fetched this time (DNS timeout or SERVFAIL).

DKIM alone never refuses a message: its results count through DMARC.
"""

from __future__ import annotations

import logging

import attrs
import dkim

from mta.policy import dkimcanon, dkimfast, dkimrsa
from mta.policy.authdns import AuthDNS, DNSTemporaryError

dkimrsa.install()  # RSA through OpenSSL: see mta.policy.dkimrsa
dkimcanon.install()  # no regular expression where it would change nothing

# dkimpy logs every failed signature at error level; its result is ours to log.
_quiet = logging.getLogger("mta.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@attrs.frozen
class DKIMResult:
    result: str  # pass | fail | permerror | temperror
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    reason: str = ""
    identity: str = ""  # i=, when present
    b: str = ""  # the first characters of b=, to tell signatures apart (RFC 6008)

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def verify_signatures(message: bytes, dns: AuthDNS, *, minkey: int = 1024) -> tuple:
    """Blocking: a `DKIMResult` for each DKIM-Signature of `message` (CRLF line
    endings), or () when it has none.  A signature that `dkimfast` finds passing
    is reported so; any other goes through dkimpy's `DKIM.verify`."""
    headers, body = dkim.rfc822_parse(message)
    signatures = [h for h in headers if h[0].lower() == b"dkim-signature"]
    checker = None
    results = []
    for i, header in enumerate(signatures):
        passed = dkimfast.verify_pass(headers, body, header, dns, minkey=minkey)
        if passed is not None:
            results.append(_described("pass", "", passed))
            continue
        if checker is None:
            checker = dkim.DKIM(message, logger=_quiet, minkey=minkey)
        results.append(_verify_one(checker, i, dns))
    return tuple(results)


def _verify_one(checker: dkim.DKIM, idx: int, dns: AuthDNS) -> DKIMResult:
    found: list[bool] = []

    def dnsfunc(name, timeout=5):
        record = dns.dkim_dnsfunc(name, timeout)
        found.append(record is not None)
        return record

    checker.domain = checker.selector = None
    checker.signature_fields = {}
    try:
        ok = checker.verify(idx=idx, dnsfunc=dnsfunc)
        reason = "" if ok else "signature did not verify"
        result = "pass" if ok else "fail"
    except DNSTemporaryError as e:
        result, reason = "temperror", f"key lookup failed: {e}"
    except dkim.ValidationError as e:
        reason = str(e) or type(e).__name__
        # dkimpy raises for a body hash mismatch: a signature that did not verify
        result = "fail" if "body hash" in reason else "permerror"
        if result == "fail":
            reason = "body hash did not verify"
    except dkim.DKIMException as e:
        result, reason = "permerror", str(e) or type(e).__name__
    if result == "fail" and found and not found[-1]:
        result, reason = "permerror", "no key published"
    elif result == "fail" and not found and reason != "body hash did not verify":
        # dkimpy gave up before fetching the key: a malformed or unusable signature
        result, reason = "permerror", "signature not usable"
    fields = getattr(checker, "signature_fields", None) or {}
    return _described(result, reason, fields, checker.domain, checker.selector)


def _described(result: str, reason: str, fields: dict, domain=None, selector=None):
    """The `DKIMResult` of a signature whose tags are `fields` (d= and s= from
    `domain` and `selector` when the tags could not be read)."""
    return DKIMResult(
        result,
        _text(fields.get(b"d") or domain),
        _text(fields.get(b"s") or selector),
        _text(fields.get(b"a")),
        reason,
        _text(fields.get(b"i")),
        _text(fields.get(b"b", b""))[:8],
    )


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return "".join(str(value).split())
