"""The Received trace header (RFC 5321 4.4, protocol names from RFC 3848 / RFC 6531)."""

from __future__ import annotations

import email.utils
import re

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def _clean(text: str, limit: int = 255) -> str:
    """Client-supplied text (the HELO name) made safe for a header."""
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


_last_date: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    """The RFC 5322 date of `now` (whole seconds), formatted once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        # usegmt gives "+0000"-equivalent GMT; RFC 5322 3.3 reserves -0000 for "local
        # time unknown", so spell UTC as +0000.
        text = email.utils.formatdate(second, localtime=False)
        _last_date = (second, text[:-5] + "+0000" if text.endswith("-0000") else text)
    return _last_date[1]


def protocol_name(*, esmtp: bool, tls: bool, auth: bool, utf8: bool) -> str:
    if utf8:
        base = "UTF8SMTP"
    elif esmtp:
        base = "ESMTP"
    else:
        return "SMTP"  # RFC 3848 defines no suffixes for plain SMTP
    return base + ("S" if tls else "") + ("A" if auth else "")


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: str | None,
    now: float,
) -> bytes:
    """One folded Received header ending in CRLF."""
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    lines = [f"Received: from {_clean(helo)} ([{ip}])"]
    by = f"\tby {hostname} (mta) with {protocol}"
    if tls:
        by += f" ({_clean(tls, 100)})"
    lines.append(f"{by} id {queue_id}")
    date = _date(now)
    if recipient:
        lines.append(f"\tfor <{recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
