"""Attachment rules: refuse (or quarantine) messages carrying blocked file types.

`[checks] blocked_attachments` lists file-name extensions (``exe``, ``tar.gz``) and
MIME types (``application/x-msdownload``).  At the end of DATA the message is parsed
with the stdlib `email` package and every part is looked at, however deeply nested
(multiparts and attached ``message/rfc822`` messages alike):

- its file names: the Content-Disposition ``filename`` and the Content-Type ``name``
  parameters, RFC 2231 and RFC 2047 decoded;
- its MIME type;
- for a zip archive (by name, type or magic bytes), the names of its members, and of
  the members of zips inside it, a bounded number of levels, entries and bytes.

Parsing blocks, so it runs on a thread (`run_blocking`: the composition root gives it
the bounded pool of check work; `deferToThread` by default);
at most `max_bytes` of the message are read, so a huge message costs bounded memory
(an attachment beyond that point is not seen).  The answer is
``554 5.7.1 Message refused: attachment <name> is not allowed``, or a QUARANTINE
with that reason when `action` is ``quarantine``.
"""

from __future__ import annotations

import email
import email.policy
import io
import zipfile
from collections.abc import Callable, Iterable
from email.header import decode_header, make_header
from email.utils import collapse_rfc2231_value

from twisted.internet import threads
from zope.interface import implementer

from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.verdict import Phase, PolicyContext, Verdict

log = Logger()

MAX_BYTES = 10 * 1024 * 1024
MAX_ZIP_ENTRIES = 1000
MAX_ZIP_DEPTH = 2
MAX_INNER_ZIP = 5 * 1024 * 1024
_ZIP_TYPES = frozenset(("application/zip", "application/x-zip-compressed", "application/x-zip"))
_NAME_LIMIT = 100


class BlockedList:
    """The configured extensions and MIME types, and what a name or type matches."""

    def __init__(self, entries: Iterable[str]):
        entries = [e.strip().lower().lstrip(".") for e in entries if e.strip()]
        self.types = frozenset(e for e in entries if "/" in e)
        self.suffixes = tuple("." + e for e in entries if "/" not in e)

    def __bool__(self) -> bool:
        return bool(self.types or self.suffixes)

    def name_blocked(self, name: str) -> bool:
        base = name.replace("\\", "/").rsplit("/", 1)[-1].strip().rstrip(".").lower()
        return bool(base) and base.endswith(self.suffixes)

    def type_blocked(self, ctype: str) -> bool:
        return ctype.lower() in self.types


def _decode(value) -> str | None:
    """A parameter value as text: RFC 2231 collapsed, RFC 2047 encoded-words decoded."""
    if value is None:
        return None
    text = collapse_rfc2231_value(value) if isinstance(value, tuple) else str(value)
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except (ValueError, LookupError, UnicodeError):
            pass
    return text


def _names(part) -> list[str]:
    names = []
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            value = part.get_param(param, header=header)
        except Exception:  # a malformed header: nothing to read there
            value = None
        text = _decode(value)
        if text:
            names.append(text)
    return names


def _is_zip(ctype: str, names: list[str], payload: bytes) -> bool:
    return (
        ctype in _ZIP_TYPES
        or any(n.lower().endswith(".zip") for n in names)
        or payload[:4] == b"PK\x03\x04"
    )


def _zip_member(blocked: BlockedList, data: bytes, depth: int) -> str | None:
    """The first blocked member name inside the zip `data` (or in zips inside it)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None
    with archive:
        for i, info in enumerate(archive.infolist()):
            if i >= MAX_ZIP_ENTRIES:
                break
            if blocked.name_blocked(info.filename):
                return info.filename
            if (
                depth < MAX_ZIP_DEPTH
                and info.filename.lower().endswith(".zip")
                and info.file_size <= MAX_INNER_ZIP
            ):
                try:
                    inner = archive.read(info)
                except (zipfile.BadZipFile, RuntimeError, ValueError, OSError, EOFError):
                    continue  # encrypted or damaged: its own names are not readable
                found = _zip_member(blocked, inner, depth + 1)
                if found is not None:
                    return found
    return None


def find_blocked(blocked: BlockedList, data: bytes) -> str | None:
    """The first blocked file name (or MIME type) in the message `data`, or None."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in message.walk():
        ctype = part.get_content_type()
        names = _names(part)
        for name in names:
            if blocked.name_blocked(name):
                return name
        if blocked.type_blocked(ctype):
            return names[0] if names else ctype
        if part.is_multipart():
            continue
        if ctype in _ZIP_TYPES or names or part.get("content-transfer-encoding"):
            try:
                payload = part.get_payload(decode=True) or b""
            except Exception:
                continue
            if _is_zip(ctype, names, payload):
                member = _zip_member(blocked, payload, 1)
                if member is not None:
                    archive = names[0] if names else "zip archive"
                    return f"{member} (in {archive})"
    return None


def read_limited(body, limit: int) -> bytes:
    """Up to `limit` bytes from the start of an `IMessageBody` (blocking)."""
    out = []
    size = 0
    chunks = body.chunks()
    try:
        for chunk in chunks:
            out.append(chunk[: limit - size])
            size += len(out[-1])
            if size >= limit:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return b"".join(out)


def _printable(name: str) -> str:
    """A file name fit for an SMTP reply: ASCII, one line, bounded."""
    text = "".join(c if " " <= c < "\x7f" else "?" for c in name)
    return text if len(text) <= _NAME_LIMIT else text[: _NAME_LIMIT - 3] + "..."


@implementer(IPolicyCheck)
class AttachmentCheck:
    """At the end of DATA: a 554 (or QUARANTINE) for a message with a blocked
    attachment, else CONTINUE."""

    name = "attachments"
    phases = (Phase.DATA,)

    def __init__(
        self,
        blocked: Iterable[str],
        *,
        action: str = "reject",
        run_blocking: Callable | None = None,
        max_bytes: int = MAX_BYTES,
    ):
        if action not in ("reject", "quarantine"):
            raise ValueError(f"unknown attachment action {action!r}")
        self.blocked = BlockedList(blocked)
        self.action = action
        self._run = run_blocking or threads.deferToThread
        self.max_bytes = max_bytes

    def check(self, phase: Phase, context: PolicyContext):
        if context.body is None or not self.blocked:
            return Verdict.CONTINUE
        d = self._run(self.scan, context.body)
        return d.addCallback(self._verdict, context)

    def scan(self, body) -> str | None:
        """Blocking: the first blocked name in the message, or None."""
        return find_blocked(self.blocked, read_limited(body, self.max_bytes))

    def _verdict(self, found: str | None, context: PolicyContext) -> Verdict:
        if found is None:
            return Verdict.CONTINUE
        name = _printable(found)
        log.info(
            "blocked attachment {name} from {client} ({action})",
            event="attachment_blocked",
            name=name,
            client=context.client_address,
            session=context.session_id,
            action=self.action,
        )
        if self.action == "quarantine":
            return Verdict.quarantine(f"attachments: blocked file {name}")
        reply = Reply(554, "5.7.1", f"Message refused: attachment {name} is not allowed")
        return Verdict.reject(reply)
