"""What the session needs to know about a message's header section while it streams.

Only the header section is looked at (at most `limit` bytes of it, so memory stays
bounded), once, when it is complete: which fields are present and how many Received
fields there are (RFC 5321 6.3 loop detection).
"""

from __future__ import annotations

HEADER_LIMIT = 256 * 1024


class HeaderScanner:
    """Feed message bytes (CRLF line endings) from the start; read results after
    `done` or `finish()`."""

    __slots__ = ("_buf", "_limit", "done", "names", "received")

    def __init__(self, limit: int = HEADER_LIMIT):
        self._buf = b""
        self._limit = limit
        self.done = False
        self.names: set[str] = set()
        self.received = 0

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        start = max(0, len(self._buf) - 3)
        self._buf += data[: self._limit - len(self._buf)]
        if self._buf.startswith(b"\r\n"):
            self._parse(b"")
            return
        end = self._buf.find(b"\r\n\r\n", start)
        if end >= 0:
            self._parse(self._buf[: end + 2])
        elif len(self._buf) >= self._limit:
            self._parse(self._buf)

    def finish(self) -> None:
        if not self.done:
            self._parse(self._buf)

    def has(self, name: str) -> bool:
        return name.lower() in self.names

    def _parse(self, section: bytes) -> None:
        self.done = True
        self._buf = b""
        for line in section.split(b"\r\n"):
            if not line or line[:1] in (b" ", b"\t"):
                continue
            name, sep, _ = line.partition(b":")
            if not sep:
                continue
            key = name.strip().decode("ascii", "replace").lower()
            self.names.add(key)
            if key == "received":
                self.received += 1
