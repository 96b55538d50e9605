"""Submission fix-ups (RFC 6409 section 8.2, 8.3): add Message-ID and Date when missing.

The body streams to the spool in chunks, so the header section is never held in
memory: `HeaderScanner` is fed the chunks as they arrive (dot-unstuffed, CRLF line
endings), keeps only the start of the line in progress, and stops looking once it
has seen the empty line that ends the header section (or a line that cannot be a
header field).  At the end of DATA, `missing_headers(scanner, ...)` gives the lines
to prepend together with the Received trace header.  Only for authenticated
submission: a relay MTA must not change messages passing through it.
"""

from __future__ import annotations

import datetime
import email.utils
import re

# A header field name (RFC 5322 3.6.8: printable ASCII except ":") followed by ":".
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# Bytes of a line kept to find its field name; longer names are not ours anyway.
_HEAD = 80


class HeaderScanner:
    """Incrementally finds the end of the header section and which fields it has."""

    def __init__(self) -> None:
        self.done = False
        self.has_message_id = False
        self.has_date = False
        self.received = 0  # Received fields, for loop detection (RFC 5321 6.3)
        self._line = b""  # start of the line in progress (at most _HEAD bytes)
        self._line_len = 0

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        start = 0
        while not self.done:
            end = chunk.find(b"\n", start)
            if end < 0:
                piece = chunk[start:]
                room = _HEAD - len(self._line)
                if room > 0:
                    self._line += piece[:room]
                self._line_len += len(piece)
                return
            piece = chunk[start:end]
            room = _HEAD - len(self._line)
            line = self._line + piece[:room] if room > 0 else self._line
            length = self._line_len + len(piece)
            self._line, self._line_len = b"", 0
            self._end_line(line, length)
            start = end + 1

    def finish(self) -> None:
        """The message ended: a last line without a line break still counts."""
        if not self.done and self._line_len:
            self._end_line(self._line, self._line_len)
        self.done = True

    def _end_line(self, line: bytes, length: int) -> None:
        if line.endswith(b"\r") and length == len(line):
            line = line[:-1]
            length -= 1
        if length == 0:
            self.done = True  # the empty line between header and body
            return
        if line[:1] in (b" ", b"\t"):
            return  # folded continuation of the previous field
        match = _FIELD.match(line)
        if match is None:
            self.done = True  # not a header field: the body has begun
            return
        name = match.group(1).lower()
        if name == b"message-id":
            self.has_message_id = True
        elif name == b"date":
            self.has_date = True
        elif name == b"received":
            self.received += 1


def rfc5322_date(now: float) -> str:
    """`now` (Unix seconds) as an RFC 5322 date-time in UTC (`+0000`)."""
    moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
    return email.utils.format_datetime(moment)


def missing_headers(scanner: HeaderScanner, *, queue_id: str, hostname: str, now: float) -> bytes:
    """The header lines (CRLF-terminated) to prepend; b"" when nothing is missing."""
    lines = []
    if not scanner.has_message_id:
        lines.append(f"Message-ID: <{queue_id}@{hostname}>\r\n")
    if not scanner.has_date:
        lines.append(f"Date: {rfc5322_date(now)}\r\n")
    return "".join(lines).encode("utf-8")
