"""Decoding the DATA and BDAT streams on whole buffers, never line by line.

DATA ends only at CRLF "." CRLF (RFC 5321 4.1.1.4).  A bare LF or bare CR never ends
it, and a message that contains one anywhere is marked so the session can refuse it:
such sequences are how SMTP smuggling (CVE-2023-51764 and friends) hides a second
message inside the first, and a message stored with them could be relayed onward to
a server that does split on them.

Both decoders work on each received buffer with a handful of C-level bytes
operations (`find`, `replace`, `count`), so per-message CPU does not grow with the
number of lines.
"""

from __future__ import annotations

_TERMINATOR = b"\r\n.\r\n"


def _bare_line_endings(region: bytes) -> bool:
    """True when `region` contains a CR not followed by LF or an LF not after CR."""
    crlf = region.count(b"\r\n")
    return region.count(b"\n") != crlf or region.count(b"\r") != crlf


class DotDecoder:
    """Turns the raw DATA stream into message bytes.

    `feed(data)` returns `(body_bytes, rest)`: `rest` is None while the message
    continues, or the bytes received after the terminating dot (pipelined commands)
    once it has ended.  The decoder keeps at most four bytes between calls, so a
    terminator or a dot-stuffed line split across TCP segments is still recognised.
    """

    __slots__ = ("_tail", "_first", "bare_line_endings", "done")

    def __init__(self) -> None:
        # A virtual CRLF before the first line makes "." on the first line, and an
        # empty message, the same case as everywhere else.
        self._tail = b"\r\n"
        self._first = True
        self.bare_line_endings = False
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
            # Split where no CRLF "." can straddle the boundary: before the last
            # CRLF when it is within the final four bytes (it may start the
            # terminator), else keep only a trailing CR.
            length = len(buf)
            j = buf.rfind(b"\r\n")
            if j >= 0 and length - j <= 4:
                split = j
            elif buf.endswith(b"\r"):
                split = length - 1
            else:
                split = length
            region = buf[:split]
            self._tail = buf[split:]
            if not region:
                return b"", None
        if not self.bare_line_endings and _bare_line_endings(region):
            self.bare_line_endings = True
        body = region.replace(b"\r\n.", b"\r\n")
        if self._first:
            self._first = False
            body = body[2:]
        return body, rest


class ChunkChecker:
    """Tracks bare CR / LF across the chunks of a BDAT transfer (RFC 3030).

    BDAT needs no unstuffing, but its content is relayed onward inside DATA, so the
    same smuggling rule applies.
    """

    __slots__ = ("_pending_cr", "bare_line_endings")

    def __init__(self) -> None:
        self._pending_cr = False
        self.bare_line_endings = False

    def feed(self, chunk: bytes) -> None:
        if not chunk or self.bare_line_endings:
            return
        region = chunk
        if self._pending_cr:
            region = b"\r" + chunk
        self._pending_cr = region.endswith(b"\r")
        if self._pending_cr:
            region = region[:-1]
        if _bare_line_endings(region):
            self.bare_line_endings = True

    def finish(self) -> None:
        """A message ending in a lone CR has a bare CR."""
        if self._pending_cr:
            self.bare_line_endings = True
            self._pending_cr = False
