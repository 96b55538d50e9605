"""The Authentication-Results header field (RFC 8601) and what it must not be.

`authentication_results(...)` writes our one field, authserv-id our host name:
`spf=… smtp.mailfrom=…` (or `smtp.helo=` for a null reverse path), one `dkim=…
header.d=… header.s=… header.b=…` per signature (`dkim=none` without one),
`dmarc=… (p=… dis=…) header.from=…` and `arc=…`; a method whose check is off is left
out.  Downstream software (MUAs, Sieve filters) trusts an Authentication-Results
that names our host, so one that arrived with the message names us falsely:
`forged_results(hostname)` is the `HeaderMatch` that removes it (RFC 8601 5).

`from_domains(header_block)` reads the RFC5322.From domains DMARC is about.
"""

from __future__ import annotations

import email.utils
import re

from mta.headers import HeaderMatch, results_by

# RFC 2045 token characters: a property value that is not one gets quoted.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~@]+")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# One From address, alone or after a plain display name (atoms, or one quoted string
# without escapes): what almost every message has.  Anything else (groups, comments,
# several addresses, encoded words with specials) goes through email.utils.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+"
_SIMPLE_FROM = re.compile(
    rf'[ \t]*(?:{_ATEXT}(?:[ \t]+{_ATEXT})*[ \t]*|"[^"\\\r\n]*"[ \t]*)?<({_ATEXT}@[A-Za-z0-9.-]+)>[ \t]*'
    rf"|[ \t]*({_ATEXT}@[A-Za-z0-9.-]+)[ \t]*"
)


def forged_results(hostname: str) -> HeaderMatch:
    """Authentication-Results fields whose authserv-id is `hostname` (after optional
    comments; a version number may follow it)."""
    return results_by(hostname)


def _value(text: str) -> str:
    if text and _TOKEN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _comment(text: str) -> str:
    clean = re.sub(r"[()\\\r\n]", " ", text).strip()
    return f" ({clean[:120]})" if clean else ""


def authentication_results(hostname: str, spf=None, dkim=None, dmarc=None, arc=None) -> bytes:
    """The field for the results given (None: that check is off); `dkim` is a
    sequence of `DKIMResult` (empty: the message is unsigned)."""
    parts = []
    if spf is not None:
        if spf.identity == "helo":
            prop = f"smtp.helo={_value(spf.domain)}"
        else:
            prop = f"smtp.mailfrom={_value(spf.sender)}"
        parts.append(f"spf={spf.result} {prop}")
    if dkim is not None:
        if not dkim:
            parts.append("dkim=none")
        for sig in dkim:
            text = f"dkim={sig.result}"
            if sig.result != "pass" and sig.reason:
                text += _comment(sig.reason)
            text += f" header.d={_value(sig.domain)} header.s={_value(sig.selector)}"
            if sig.algorithm:
                text += f" header.a={_value(sig.algorithm)}"
            if sig.b:
                text += f" header.b={_value(sig.b)}"
            parts.append(text)
    if dmarc is not None:
        text = f"dmarc={dmarc.result}"
        if dmarc.policy:
            text += f" (p={dmarc.policy} dis={dmarc.disposition.upper()})"
        elif dmarc.reason and dmarc.result != "pass":
            text += _comment(dmarc.reason)
        if dmarc.from_domain:
            text += f" header.from={_value(dmarc.from_domain)}"
        parts.append(text)
    if arc is not None:
        text = f"arc={arc.result}"
        if arc.result != "none":
            text += _comment(f"i={arc.instances} {arc.sealer} {arc.reason}".strip())
        parts.append(text)
    if not parts:
        parts.append("none")
    field = f"Authentication-Results: {hostname};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"
    return field.encode("utf-8", "replace")


def from_domains(header_block: bytes) -> list[str]:
    """The distinct domains of the addresses in the From fields (lower case, in
    order); empty when there is no From or no address in it."""
    values = []
    for field in re.split(rb"\r\n(?![ \t])", header_block):
        name, sep, value = field.partition(b":")
        if sep and name.strip().lower() == b"from":
            values.append(_FOLD.sub(b"", value).decode("utf-8", "replace"))
    domains: list[str] = []
    simple = [_SIMPLE_FROM.fullmatch(v) for v in values]
    if all(simple):  # the usual `Name <user@domain>` or bare address: no full parse
        pairs = [("", m.group(1) or m.group(2)) for m in simple]
    else:
        pairs = email.utils.getaddresses(values)
    for _name, address in pairs:
        domain = address.rpartition("@")[2].strip().strip(">").lower().rstrip(".")
        if "@" in address and domain and domain not in domains:
            domains.append(domain)
    return domains
