r"""Shortcuts for dkimpy's message parsing and relaxed canonicalization.

dkimpy canonicalizes with `re.sub` over the whole body and every signed header
field (RFC 6376 3.4.2, 3.4.4): trailing white space removed, runs of white space
compressed to one space, folded lines unfolded.  Ordinary text has single spaces
between its words, so ``[\\t ]+ -> " "`` finds hundreds of matches and replaces
each with what was there: on the benchmark's 4.7 KB message that was a third of
the time DKIM verification took.  `install()` wraps each function so that content
which cannot match is returned as it is, without the regular expression:

- compressing: no tab and no two spaces in a row;
- trailing white space: no space or tab right before a CRLF;
- unfolding: no line feed at all (the patterns of every dkimpy version need one),
  or just the CRLF that ends a field written on one line (both versions remove it).

And `dkim.rfc822_parse`, which splits the whole message into lines with a regular
expression (to accept bare LF line ends) and joins the body's lines back: when every
LF has its CR, it parses the header section alone and the body is the bytes after
the empty line, which is what that join gives.

And `dkim.RE_BTAG`, the pattern that blanks the b= value of the signature being
verified: it puts an optional folding-white-space group before every base64
character, which made that one substitution cost more than the RSA verification.
FWS there, ``(?:(?:\s*\r?\n)?\s+)?``, matches exactly the white space runs ``\s*``
does, so the value is "a run of white space and base64 characters, up to its last
base64 character": one character class and a short backtrack, the same matches.

Anything else goes to dkimpy's own function, so the result is dkimpy's in every
case (tests compare both on hostile inputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import dkim
import dkim.canonicalization as canon

_original: dict[str, Callable[[bytes], bytes]] = {}


def _compress(content: bytes) -> bytes:
    if b"\t" not in content and b"  " not in content:
        return content
    return _original["compress_whitespace"](content)


def _strip_trailing(content: bytes) -> bytes:
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _original["strip_trailing_whitespace"](content)


def _unfold(content: bytes) -> bytes:
    newlines = content.count(b"\n")
    if not newlines:
        return content
    if newlines == 1 and content.endswith(b"\r\n"):  # a field on one line
        return content[:-2]
    return _original["unfold_header_value"](content)


def _parse(message: bytes):
    end = message.find(b"\r\n\r\n")
    if end < 0 or message.startswith(b"\r\n") or message.count(b"\n") != message.count(b"\r\n"):
        return _original["rfc822_parse"](message)
    headers, _ = _original["rfc822_parse"](message[: end + 4])
    return headers, message[end + 4 :]


_SHORTCUTS = {
    "compress_whitespace": _compress,
    "strip_trailing_whitespace": _strip_trailing,
    "unfold_header_value": _unfold,
}


RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?(?:\r?\n\Z)?")


def install() -> None:
    """Put the shortcuts in front of dkimpy's functions (idempotent)."""
    for module, name, shortcut in [(canon, n, f) for n, f in _SHORTCUTS.items()] + [
        (dkim, "rfc822_parse", _parse)
    ]:
        current = getattr(module, name)
        if current is shortcut:
            continue
        _original[name] = current
        setattr(module, name, shortcut)
    if dkim.RE_BTAG is not RE_BTAG:
        _original["RE_BTAG"] = dkim.RE_BTAG
        dkim.RE_BTAG = RE_BTAG
