"""Downgrading UTF-8 header fields for a peer without SMTPUTF8 (RFC 6532, RFC 2047).

A message received with SMTPUTF8 may carry raw UTF-8 in its header fields (RFC
6532); they may cross the wire only inside an SMTPUTF8 transaction.  When the next
server does not offer SMTPUTF8 (and every envelope address is ASCII), the relay
sends a *downgraded* copy instead: only the header section is rewritten, the body
follows unchanged.

`downgrade_headers(block)` rewrites each header field that contains non-ASCII
characters (ASCII fields are kept byte for byte, folding included):

- address fields (From, To, Cc, Reply-To, Sender, the Resent-* ones ...): display
  names and group names become RFC 2047 encoded-words; an address whose addr-spec
  itself is non-ASCII (local part or domain) cannot be represented, and neither can
  a field we cannot parse: `DowngradeError`.  Comments in such a field are dropped.
- Content-Type and Content-Disposition: non-ASCII parameter values are written
  RFC 2231 style (``name*=utf-8''R%C3%A9sum%C3%A9.txt``, continued when long).
- identification fields (Message-ID, References, In-Reply-To, Content-ID,
  Return-Path ...) hold identifiers that no encoding preserves: `DowngradeError`.
- every other field (Subject, Comments, Keywords, X-*, trace fields ...): the
  whitespace-separated words that contain non-ASCII characters become
  encoded-words, runs of them together; ASCII words stay as they are.

Encoded-words use UTF-8 with the Q encoding restricted to the characters RFC 2047
5(3) allows in a phrase, are at most 75 characters long, and the rewritten field is
folded at 78 columns where it can be.

`DowngradedBody` is the downgraded message as an `IMessageBody`: the new header
section, then the original from its empty line on, streamed from the original's
`chunks`.  `downgrade_body` (blocking) builds one from a queued message, or returns
None when its header section is plain ASCII already.
"""

from __future__ import annotations

import email.errors
import urllib.parse
from email.headerregistry import Address as MailAddress
from email.headerregistry import HeaderRegistry

from zope.interface import implementer

from mta.fileio import write_all
from mta.interfaces import IMessageBody

# The longest header section we rewrite; a longer one is refused (5.6.7).
MAX_HEADER_SECTION = 256 * 1024

ADDRESS_FIELDS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "resent-from",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "disposition-notification-to",
        "mail-followup-to",
        "mail-reply-to",
        "errors-to",
        "return-receipt-to",
        "original-recipient",
    }
)
MIME_PARAMETER_FIELDS = frozenset({"content-type", "content-disposition"})
IDENTIFIER_FIELDS = frozenset(
    {
        "message-id",
        "resent-message-id",
        "in-reply-to",
        "references",
        "content-id",
        "return-path",
        "original-message-id",
        "dkim-signature",
        "arc-seal",
        "arc-message-signature",
    }
)

_FOLD_AT = 78
_EW_MAX = 75
_EW_OPEN = "=?utf-8?q?"
_EW_CLOSE = "?="
_Q_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_REGISTRY = HeaderRegistry()
_FATAL_DEFECTS = (email.errors.InvalidHeaderDefect, email.errors.HeaderMissingRequiredValue)


class DowngradeError(ValueError):
    """The header section cannot be represented in ASCII; the message says why."""


# -- encoded-words ----------------------------------------------------------------


def _q_char(ch: str) -> str:
    out = []
    for byte in ch.encode("utf-8"):
        if byte == 0x20:
            out.append("_")
        elif byte in _Q_SAFE:
            out.append(chr(byte))
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


def encoded_words(text: str) -> list[str]:
    """`text` as RFC 2047 Q-encoded UTF-8 words of at most 75 characters, never
    splitting a character; adjacent ones decode back to `text` exactly."""
    room = _EW_MAX - len(_EW_OPEN) - len(_EW_CLOSE)
    words: list[str] = []
    current = ""
    for ch in text:
        piece = _q_char(ch)
        if current and len(current) + len(piece) > room:
            words.append(_EW_OPEN + current + _EW_CLOSE)
            current = ""
        current += piece
    if current:
        words.append(_EW_OPEN + current + _EW_CLOSE)
    return words


def _text_tokens(value: str) -> list[str]:
    """Unstructured text as tokens: ASCII words as they are, each run of words with
    non-ASCII characters as encoded-words (the spaces inside a run encoded with it,
    since the whitespace between adjacent encoded-words is not part of the text)."""
    tokens: list[str] = []
    run: list[str] = []
    for word in value.split():
        if word.isascii():
            if run:
                tokens += encoded_words(" ".join(run))
                run = []
            tokens.append(word)
        else:
            run.append(word)
    if run:
        tokens += encoded_words(" ".join(run))
    return tokens


def _fold(name: str, tokens: list[str]) -> bytes:
    """`Name: token token ...` folded before a token that would pass column 78."""
    lines = [f"{name}:"]
    for token in tokens:
        if len(lines[-1]) + 1 + len(token) > _FOLD_AT and lines[-1].strip() not in ("", f"{name}:"):
            lines.append(" " + token)
        else:
            lines[-1] += " " + token
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# -- fields -----------------------------------------------------------------------


def _phrase_tokens(text: str) -> list[str]:
    return encoded_words(text) if not text.isascii() else [text]


def _mailbox_tokens(address) -> list[str]:
    if not (address.username.isascii() and address.domain.isascii()):
        raise DowngradeError(f"the address {address.addr_spec} is not ASCII")
    if not address.display_name:
        return [address.addr_spec]
    if address.display_name.isascii():
        return [str(MailAddress(display_name=address.display_name, addr_spec=address.addr_spec))]
    return [*encoded_words(address.display_name), f"<{address.addr_spec}>"]


def _address_field(name: str, value: str) -> list[str]:
    try:
        header = _REGISTRY(name, value)
        groups = header.groups
    except Exception as e:  # the stdlib parser raises on some malformed input
        raise DowngradeError(f"the {name} field cannot be parsed: {e}") from None
    for defect in header.defects:
        if isinstance(defect, email.errors.NonASCIILocalPartDefect):
            continue  # reported below with the address
        if isinstance(defect, _FATAL_DEFECTS):
            raise DowngradeError(f"the {name} field cannot be parsed: {defect}")
    items: list[list[str]] = []
    for group in groups:
        mailboxes = [_mailbox_tokens(a) for a in group.addresses]
        if group.display_name is None:
            items += mailboxes
            continue
        tokens = _phrase_tokens(group.display_name)
        tokens[-1] += ":"
        for i, mailbox in enumerate(mailboxes):
            tokens += mailbox
            if i < len(mailboxes) - 1:
                tokens[-1] += ","
        tokens[-1] += ";"
        items.append(tokens)
    if not items:
        raise DowngradeError(f"the {name} field has no address")
    out: list[str] = []
    for i, tokens in enumerate(items):
        out += tokens
        if i < len(items) - 1:
            out[-1] += ","
    return out


def _parameter_tokens(name: str, value: str) -> list[str]:
    if value.isascii():
        return [f"{name}={_quote(value)}"]
    encoded = urllib.parse.quote(value.encode("utf-8"), safe="!#$&+-.^_`|~")
    if len(name) + len(encoded) + 9 <= _FOLD_AT - 2:
        return [f"{name}*=utf-8''{encoded}"]
    # RFC 2231 3: continuations, never splitting a %XX escape.
    pieces, i = [], 0
    while i < len(encoded):
        end = min(i + 60, len(encoded))
        while end < len(encoded) and "%" in encoded[end - 2 : end]:
            end -= 1
        pieces.append(encoded[i:end])
        i = end
    return [
        f"{name}*{n}*=" + ("utf-8''" if n == 0 else "") + piece for n, piece in enumerate(pieces)
    ]


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "!#$%&'*+-.^_`{|}~" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mime_parameter_field(name: str, value: str) -> list[str]:
    try:
        header = _REGISTRY(name, value)
        main = header.content_type if name.lower() == "content-type" else header.content_disposition
        params = dict(header.params)
    except Exception as e:
        raise DowngradeError(f"the {name} field cannot be parsed: {e}") from None
    if not main or not main.isascii() or any(not k.isascii() for k in params):
        raise DowngradeError(f"the {name} field cannot be downgraded")
    tokens = [main]
    for key, param in params.items():
        tokens[-1] += ";"
        parts = _parameter_tokens(key, param)
        for part in parts[:-1]:
            tokens.append(part + ";")
        tokens.append(parts[-1])
    return tokens


def downgrade_field(name: str, value: str) -> bytes:
    """One header field (`value` unfolded, non-ASCII) rewritten in ASCII."""
    key = name.lower()
    if key in ADDRESS_FIELDS:
        tokens = _address_field(name, value)
    elif key in MIME_PARAMETER_FIELDS:
        tokens = _mime_parameter_field(name, value)
    elif key in IDENTIFIER_FIELDS:
        raise DowngradeError(f"the {name} field holds a non-ASCII identifier")
    else:
        tokens = _text_tokens(value)
    return _fold(name, tokens)


def split_fields(block: bytes) -> list[bytes]:
    """A header section (CRLF lines) as its fields, each with its folding and CRLF."""
    fields: list[bytes] = []
    lines = block.split(b"\r\n")
    if block.endswith(b"\r\n"):
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields


def downgrade_headers(block: bytes) -> bytes:
    """The header section `block` with every non-ASCII field downgraded (see the
    module docstring); DowngradeError when one cannot be."""
    out = []
    for raw in split_fields(block):
        if raw.isascii():
            out.append(raw)
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = raw.partition(b":")[0].decode("ascii", "replace")
            raise DowngradeError(f"the {name} field is not UTF-8") from None
        name, colon, value = text.partition(":")
        if not colon or not name or not name.isascii() or name != name.strip():
            raise DowngradeError("a header line with non-ASCII characters is not a field")
        out.append(downgrade_field(name, value.replace("\r\n", "")))
    return b"".join(out)


# -- the downgraded message -------------------------------------------------------


@implementer(IMessageBody)
class DowngradedBody:
    """`headers`, then `original` from byte `skip` on (its empty line and body)."""

    def __init__(self, original, headers: bytes, skip: int):
        self.original = original
        self.headers = headers
        self.skip = skip

    @property
    def size(self) -> int:
        return len(self.headers) + self.original.size - self.skip

    def header_block(self, limit: int = 65536) -> bytes:
        if len(self.headers) <= limit:
            return self.headers
        cut = self.headers.rfind(b"\r\n", 0, limit - 1)
        return self.headers[: cut + 2] if cut >= 0 else b""

    def chunks(self, chunk_size: int = 262144):
        for i in range(0, len(self.headers), chunk_size):
            yield self.headers[i : i + chunk_size]
        inner = self.original.chunks(chunk_size)
        skip = self.skip
        try:
            for chunk in inner:
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                yield chunk
        finally:
            inner.close()

    def copy_into(self, fd: int, prefix: bytes = b"") -> int:
        written = write_all(fd, [prefix])
        chunks = self.chunks()
        try:
            for chunk in chunks:
                written += write_all(fd, [chunk])
        finally:
            chunks.close()
        return written


def downgrade_body(body, limit: int = MAX_HEADER_SECTION) -> DowngradedBody | None:
    """Blocking: `body` (an `IMessageBody`) with its header section downgraded, or
    None when that section is ASCII.  DowngradeError when it cannot be downgraded,
    or is longer than `limit` (then it cannot be checked either)."""
    block = body.header_block(limit)
    if len(block) < body.size and _read_at(body, len(block), 2) not in (b"", b"\r\n"):
        raise DowngradeError(f"the header section is longer than {limit} bytes")
    if block.isascii():
        return None
    # A message without a body may lack the last CRLF, which header_block adds.
    return DowngradedBody(body, downgrade_headers(block), min(len(block), body.size))


def _read_at(body, offset: int, count: int) -> bytes:
    """`count` bytes of `body`'s stream at `offset` (reading through `chunks`)."""
    chunks = body.chunks(max(offset + count, 4096))
    try:
        seen = b""
        for chunk in chunks:
            seen += chunk
            if len(seen) >= offset + count:
                break
        return seen[offset : offset + count]
    finally:
        chunks.close()
