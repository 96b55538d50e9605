"""Header fields a message must lose before it is queued: `HeaderMatch` and `remove_fields`.

A check that finds a header field we must not pass on as it came (an
`Authentication-Results` claiming our own host name, `X-Spam-*` tags that spamd's
answer replaces) names it with a `HeaderMatch` in its verdict; the session asks the
spool file to drop the matching fields (`ISpoolFile.remove_headers`) before the
commit, and `remove_fields` is the one piece of code that edits a header section.
The policy builds matches, the session carries them and the queue applies them, so
this module imports none of them.  A message without such fields costs nothing: a
check asks for a removal only when it saw a field to remove.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import attrs

# A header field name (RFC 5322 3.6.8: printable ASCII except ":") followed by ":".
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


@functools.lru_cache(maxsize=64)
def _pattern(value: str) -> re.Pattern:
    return re.compile(value.encode("utf-8"), re.IGNORECASE)


@attrs.frozen
class HeaderMatch:
    """Fields named `name` (any case) whose unfolded value, leading white space
    skipped, starts with a match of the regular expression `value` (case
    insensitive); every field of that name when `value` is None."""

    name: str
    value: str | None = None

    def matches(self, name: bytes, value: bytes) -> bool:
        if name.lower() != self.name.lower().encode("ascii"):
            return False
        if self.value is None:
            return True
        unfolded = _FOLD.sub(b"", value).lstrip(b" \t")
        return _pattern(self.value).match(unfolded) is not None


def results_by(authserv_id: str) -> HeaderMatch:
    """Authentication-Results fields whose authserv-id (RFC 8601 2.5, after optional
    comments; a version may follow) is `authserv_id`."""
    return HeaderMatch(
        "Authentication-Results",
        r"(?:\([^)]*\)\s*)*" + re.escape(authserv_id.rstrip(".")) + r"\.?(?![\w.-])",
    )


def header_end(data: bytes) -> int | None:
    """Offset just past the CRLF ending the last header line of the message that
    starts with `data` (0 for a message without header fields), or None when the
    header section does not end within `data`."""
    if data.startswith(b"\r\n"):
        return 0
    end = data.find(b"\r\n\r\n")
    return None if end < 0 else end + 2


def remove_fields(head: bytes, matches: Iterable[HeaderMatch]) -> tuple[bytes, int]:
    """`head` (the start of a message: its header section, possibly followed by more)
    without the header fields one of `matches` names, and how many fields went.
    Returns `head` itself when nothing matched."""
    matches = tuple(matches)
    if not _may_have(head, matches):
        return head, 0
    out: list[bytes] = []
    removed = 0
    keep_from = pos = 0
    n = len(head)
    while pos < n:
        nl = head.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = head[pos:end]
        if line in (b"\r\n", b"\n"):
            break  # the empty line: the body follows
        m = _FIELD.match(line)
        if m is None:
            break  # not a header field: the body has begun
        while end < n and head[end : end + 1] in (b" ", b"\t"):
            nl = head.find(b"\n", end)
            end = n if nl < 0 else nl + 1
        name, value = m.group(1), head[pos + m.end() : end]
        if any(match.matches(name, value) for match in matches):
            out.append(head[keep_from:pos])
            keep_from = end
            removed += 1
        pos = end
    if not removed:
        return head, 0
    out.append(head[keep_from:])
    return b"".join(out), removed


def _may_have(head: bytes, matches: tuple[HeaderMatch, ...]) -> bool:
    """False when no line of `head` can start with a name of `matches`: one scan in
    C instead of the field-by-field walk in Python, which the sender-auth checks
    made for every message (almost none has a field to remove)."""
    lowered = head.lower()
    for match in matches:
        name = match.name.lower().encode("ascii")
        if lowered.startswith(name) or b"\n" + name in lowered:
            return True
    return False


def field_present(head: bytes, matches: Iterable[HeaderMatch]) -> bool:
    """True when the header section at the start of `head` has a field one of
    `matches` names (what a check asks before it asks for a removal)."""
    return remove_fields(head, matches)[1] > 0
