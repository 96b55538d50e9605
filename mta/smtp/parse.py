"""Parsing MAIL FROM / RCPT TO arguments into a path and ESMTP parameters.

The path is delimited by its angle brackets with quoted strings honoured, so a quoted
local part may contain spaces or '>' without confusing the parameter list.
"""

from __future__ import annotations

import attrs

from mta.envelope import Reply
from mta.smtp.replies import printable


class CommandError(Exception):
    """A syntax problem in a command; carries the reply to send."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


@attrs.frozen
class PathArgument:
    path: str
    params: dict[str, str | None]


def split_path_argument(arg: str, keyword: str, enhanced: str) -> PathArgument:
    """Split `FROM:<path> K=V ...` (keyword `FROM`) into the path and its parameters.

    A space after the colon is tolerated (many clients send it); anything else that
    is not `<...>` followed by parameters is a syntax error.
    """
    head = arg[: len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise CommandError(
            Reply(
                501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
            )
        )
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if not rest.startswith("<"):
        raise CommandError(Reply(501, enhanced, "Address must be enclosed in <>"))
    end = _closing_bracket(rest)
    if end < 0:
        raise CommandError(Reply(501, enhanced, "Unterminated address"))
    path = rest[: end + 1]
    params: dict[str, str | None] = {}
    tail = rest[end + 1 :]
    if tail and not tail.startswith(" "):
        raise CommandError(Reply(501, enhanced, "Garbage after address"))
    for item in tail.split():
        name, sep, value = item.partition("=")
        name = name.upper()
        if not name or name in params:
            raise CommandError(
                Reply(501, "5.5.4", f"Invalid or repeated parameter {printable(name or item)!r}")
            )
        params[name] = value if sep else None
    return PathArgument(path, params)


def _closing_bracket(text: str) -> int:
    quoted = False
    escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (`+XX` hex escapes)."""
    out = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "+":
            hexpart = value[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in "0123456789ABCDEF" for c in hexpart):
                raise ValueError("invalid xtext")
            out.append(chr(int(hexpart, 16)))
            i += 3
        else:
            if not ("!" <= ch <= "~") or ch == "=":
                raise ValueError("invalid xtext")
            out.append(ch)
            i += 1
    return "".join(out)


_NOTIFY_WORDS = frozenset(("SUCCESS", "FAILURE", "DELAY"))


def xtext_param(value: str | None, limit: int) -> str | None:
    if not value:
        return None
    try:
        decoded = xtext_decode(value)
    except ValueError:
        return None
    if len(decoded) > limit or not decoded.isprintable():
        return None
    return decoded


def notify_param(value: str | None) -> str:
    """The normalised NOTIFY value, or "" when invalid (RFC 3461 4.1)."""
    words = [w.upper() for w in (value or "").split(",")]
    if words == ["NEVER"]:
        return "NEVER"
    if not words or not set(words) <= _NOTIFY_WORDS or len(set(words)) != len(words):
        return ""
    return ",".join(words)


def orcpt_param(value: str | None) -> str:
    """`type;address` with the xtext decoded, or "" when invalid (RFC 3461 4.2)."""
    addr_type, sep, xtext = (value or "").partition(";")
    if not sep or not addr_type or not addr_type.replace("-", "").isalnum():
        return ""
    address = xtext_param(xtext, 500)
    return f"{addr_type.lower()};{address}" if address else ""
