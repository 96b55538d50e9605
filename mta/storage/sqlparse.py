"""What the SQL and S3 stores index of a message: From, To, Subject, Date and the
text of its body, parsed by the stdlib ``email`` package (tolerant: RFC 2047 words
decoded, a malformed part skipped, never an exception).

`search_fields` is what SQLite's external-content search index (``messages_fts``,
migration ``007_search_index.sql``) is built from.  The index keeps only tokens: to
delete a row it is given the row's words again, recomputed from the stored message
through the view ``messages_search``.  So `parse_message` must give the same words
for the same bytes in every release: a change to what it extracts ships with a
migration that rebuilds the index (``INSERT INTO messages_fts(messages_fts)
VALUES('rebuild')``), and `tests/storage/test_sqlparse.py` pins its output.
"""

from __future__ import annotations

import email
import email.header
import email.parser
import email.policy
import email.utils
import json
import re
import zlib

import attrs

__all__ = ["MessageFields", "index_words", "parse_message", "search_fields", "words_crc"]

_MAX_INDEXED_TEXT = 1 << 20  # characters of body text indexed per message
_TAG_RE = re.compile(r"<[^>]*>")  # HTML tags, dropped from indexed text


@attrs.frozen
class MessageFields:
    """What the index keeps of one message."""

    message_id: str | None
    from_addr: str
    to_addrs: list
    to_text: str
    subject: str
    date: float
    headers: list
    text: str


def index_words(subject: str, from_addr: str, to_text: str, text: str) -> tuple[str, ...]:
    """The four columns of ``messages_fts`` for a message, as SQLite keeps them: NUL
    (where SQLite's JSON functions end a string) made a space, and a lone surrogate
    (which no UTF-8 holds) replaced."""
    return (_storable(subject), _storable(from_addr), _storable(to_text), _storable(text))


def search_fields(words: tuple[str, ...]) -> str:
    """`index_words` as one JSON array: what the view ``messages_search`` gives FTS5
    for a row (S3 rows keep it in ``indexed``).  Its strings come back unchanged."""
    return json.dumps(words, ensure_ascii=False)


def words_crc(words: tuple[str, ...]) -> int:
    """A check value of `index_words` (CRC-32 of their UTF-8 and lengths), kept with
    a row of the SQL store: deleting the row first checks that its message still
    gives these words, so a parser that changed (a new Python) is caught there."""
    crc = 0
    for word in words:
        data = word.encode("utf-8")
        crc = zlib.crc32(b"%d:" % len(data), zlib.crc32(data, crc))
    return crc


def _storable(text: str) -> str:
    if "\x00" in text:
        text = text.replace("\x00", " ")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class _Utf8Headers(email.policy.Compat32):
    """compat32, but a header field with 8-bit bytes is read as UTF-8 (RFC 6532:
    what SMTPUTF8 mail carries; undecodable bytes become U+FFFD).  compat32 itself
    turns every 8-bit byte into U+FFFD, so "Subject: café" was stored, listed and
    searched as "caf\ufffd\ufffd"."""

    def header_fetch_parse(self, name, value):
        if not value.isascii():  # the parser kept the bytes as surrogate escapes
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return super().header_fetch_parse(name, value)


_POLICY = _Utf8Headers()
_HEADERS_ONLY = email.parser.BytesHeaderParser(policy=_POLICY)


def parse_message(data: bytes, now: float) -> MessageFields:
    """The indexed fields of `data`; never raises (a malformed part is skipped).

    Only a MIME container (multipart/*, message/*) is parsed part by part: a
    single-part message's body is its one text, decoded as a payload, and feeding
    it line by line through the email package's parser cost more than everything
    else of storing it (40% of the store's time for 100 KB messages)."""
    msg = _parsed(data)
    headers = [[name, _decoded(value)] for name, value in msg.items()]
    date = now
    raw_date = msg.get("Date")
    if raw_date:
        try:
            parsed = email.utils.parsedate_to_datetime(str(raw_date))
            date = parsed.timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    recipients = []
    for name in ("To", "Cc"):
        recipients.extend(_decoded(v) for v in msg.get_all(name, []))
    pairs = email.utils.getaddresses(recipients)
    to_addrs = [addr for _, addr in pairs if addr]
    to_text = " ".join(f"{name} {addr}".strip() for name, addr in pairs)
    message_id = msg.get("Message-ID")
    return MessageFields(
        message_id=_decoded(message_id).strip() if message_id else None,
        from_addr=_decoded(msg.get("From", "")),
        to_addrs=to_addrs,
        to_text=to_text,
        subject=_decoded(msg.get("Subject", "")),
        date=date,
        headers=headers,
        text=_body_text(msg),
    )


def _parsed(data: bytes):
    """`data` as an email.message.Message: the header section parsed and the body
    kept whole as the payload when that is all there is to it, else (MIME parts,
    or a header section the parser finds fault with) the full parse."""
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        msg = _HEADERS_ONLY.parsebytes(data[: end + 4])
        if not msg.defects and msg.get_content_maintype() not in ("multipart", "message"):
            msg.set_payload(data[end + 4 :].decode("ascii", "surrogateescape"))
            return msg
    return email.message_from_bytes(data, policy=_POLICY)


def _decoded(value) -> str:
    """A header value with RFC 2047 words decoded, as tolerant as can be."""
    if value is None:
        return ""
    if type(value) is str and "=?" not in value:
        return value.strip()  # nothing to decode: what the email package returns too
    try:
        return str(email.header.make_header(email.header.decode_header(value))).strip()
    except Exception:
        return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace").strip()


def _body_text(msg) -> str:
    parts = []
    size = 0
    for part in msg.walk():
        if part.get_content_maintype() != "text" or part.get_filename():
            continue
        try:
            payload = part.get_payload(decode=True) or b""
            charset = part.get_content_charset() or "utf-8"
            try:
                text = payload.decode(charset, "replace")
            except LookupError:
                text = payload.decode("utf-8", "replace")
        except Exception:
            continue
        if part.get_content_subtype() == "html":
            text = _TAG_RE.sub(" ", text)
        parts.append(text)
        size += len(text)
        if size >= _MAX_INDEXED_TEXT:
            break
    return "\n".join(parts)[:_MAX_INDEXED_TEXT]
