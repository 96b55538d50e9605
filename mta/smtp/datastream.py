"""Decoding the DATA and BDAT streams on whole buffers, never line by line.

DATA ends only at CRLF "." CRLF (RFC 5321 4.1.1.4).  A bare LF or bare CR never ends
it: such sequences are how SMTP smuggling (CVE-2023-51764 and friends) hides a second
message inside the first, and a message stored with them could be relayed onward to
a server that does split on them.  What happens to a message that contains one is
`[limits] bare_newlines`:

- "reject": the decoder only marks it (`bare_line_endings`) and the session refuses
  the message (550 5.6.11);
- "normalize" (like Postfix 3.9's smtpd_forbid_bare_newline = normalize): every bare
  LF and bare CR inside the message becomes CRLF, so a line that followed one is a
  line like any other (dot-unstuffed, and never a terminator), and the message is
  stored and relayed with standard line endings only (`normalized` says it happened).

Both decoders work on each received buffer with a handful of C-level bytes
operations (`find`, `replace`, `count`), so per-message CPU does not grow with the
number of lines; a message with proper CRLFs never pays for normalising.
"""

from __future__ import annotations

import re

_TERMINATOR = b"\r\n.\r\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _bare_line_endings(region: bytes) -> bool:
    """True when `region` contains a CR not followed by LF or an LF not after CR."""
    crlf = region.count(b"\r\n")
    return region.count(b"\n") != crlf or region.count(b"\r") != crlf


def _normalize(region: bytes) -> bytes:
    """Every line ending of `region` (CRLF, bare LF, bare CR) as CRLF."""
    return _LINE_END.sub(b"\r\n", region)


class DotDecoder:
    """Turns the raw DATA stream into message bytes.

    `feed(data)` returns `(body_bytes, rest)`: `rest` is None while the message
    continues, or the bytes received after the terminating dot (pipelined commands)
    once it has ended.  The decoder keeps at most four bytes between calls, so a
    terminator or a dot-stuffed line split across TCP segments is still recognised.
    """

    __slots__ = ("_tail", "_first", "_normalize", "bare_line_endings", "normalized", "done")

    def __init__(self, normalize: bool = False) -> None:
        # A virtual CRLF before the first line makes "." on the first line, and an
        # empty message, the same case as everywhere else.
        self._tail = b"\r\n"
        self._first = True
        self._normalize = normalize
        self.bare_line_endings = False  # seen, and not normalised: refuse the message
        self.normalized = False  # seen and normalised
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        buf = self._tail + data if self._tail else data
        end = buf.find(_TERMINATOR)
        if end >= 0:
            region = buf[: end + 2]
            rest = buf[end + 5 :]
            self._tail = b""
            self.done = True
        else:
            rest = None
            split = self._split(buf)
            region = buf[:split]
            self._tail = buf[split:]
            if not region:
                return b"", None
        if _bare_line_endings(region):
            if self._normalize:
                region = _normalize(region)
                self.normalized = True
            else:
                self.bare_line_endings = True
        body = region.replace(b"\r\n.", b"\r\n")
        if self._first:
            self._first = False
            body = body[2:]
        return body, rest

    def _split(self, buf: bytes) -> int:
        """Where to cut `buf` so that nothing that needs the next bytes is decided
        now: the start of a terminator, of a dot-stuffed line, or of a CRLF."""
        length = len(buf)
        if self._normalize:
            # Any line ending (CRLF, LF or CR) in the last four bytes stays for the
            # next call, with what follows it: that covers a partial terminator, a
            # line ending followed by "." and a CR whose LF has not arrived.
            start = max(length - 4, 0)
            cr, lf = buf.find(b"\r", start), buf.find(b"\n", start)
            first = min(i for i in (cr, lf, length) if i >= 0)
            if first == lf and first > 0 and buf[first - 1] == 13:
                first -= 1  # never separate a CRLF
            return first
        # Split where no CRLF "." can straddle the boundary: before the last CRLF
        # when it is within the final four bytes (it may start the terminator), else
        # keep only a trailing CR.
        j = buf.rfind(b"\r\n")
        if j >= 0 and length - j <= 4:
            return j
        if buf.endswith(b"\r"):
            return length - 1
        return length


class ChunkChecker:
    """Tracks (or normalises) bare CR / LF across the chunks of a BDAT transfer
    (RFC 3030).

    BDAT needs no unstuffing, but its content is relayed onward inside DATA, so the
    same smuggling rule applies.  `feed(chunk)` returns the bytes to store: the
    chunk itself, or with `normalize` its line endings made CRLF (a trailing CR is
    held back until the next chunk shows whether an LF follows; `finish()` returns
    what is still held).
    """

    __slots__ = ("_pending_cr", "_normalize", "bare_line_endings", "normalized")

    def __init__(self, normalize: bool = False) -> None:
        self._pending_cr = False
        self._normalize = normalize
        self.bare_line_endings = False
        self.normalized = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return chunk
        region = b"\r" + chunk if self._pending_cr else chunk
        self._pending_cr = region.endswith(b"\r")
        if self._pending_cr:
            region = region[:-1]
        if not self._normalize:
            if not self.bare_line_endings and _bare_line_endings(region):
                self.bare_line_endings = True
            return chunk
        if _bare_line_endings(region):
            self.normalized = True
            return _normalize(region)
        return region

    def finish(self) -> bytes:
        """The end of the last chunk: a message ending in a lone CR has a bare CR."""
        if not self._pending_cr:
            return b""
        self._pending_cr = False
        if self._normalize:
            self.normalized = True
            return b"\r\n"
        self.bare_line_endings = True
        return b""
