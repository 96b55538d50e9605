"""Delivery status notifications (RFC 3464 bounces) for permanently failed mail.

When the queue runner finishes an entry with failed recipients (a 5xx reply, or the
entry outlived `[queue] max_age`), `Bouncer.bounce` writes ONE DSN for the entry,
listing every failed recipient, and commits it through the spool like any received
message, from the null sender to the original sender: local or remote delivery then
applies to it as to anything else (DESIGN.md: "bounces re-enter through the spool").

Loops are impossible by construction: the runner never asks for a bounce of a
message whose sender is null (a bounce that cannot be delivered is dead-lettered
instead, see `mta.queue.runner`).

`build_dsn` is a pure function of its arguments (the `now` and the boundary are
passed in), so the report's structure is tested without a reactor; reading the
original headers from the queue file is the only blocking step and runs on the
spool's thread pool.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Sequence

import attrs
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.envelope import NULL_ADDRESS, Address, BodyType, Envelope, RecipientState
from mta.queue.entry import QueueEntry

log = Logger()

# Enough for any sane header block; a longer one is cut at a line boundary.
MAX_HEADERS = 64 * 1024
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


@attrs.frozen
class FailedRecipient:
    """One line group of the delivery-status part."""

    final: Address
    original: Address | None
    status: str  # RFC 3463 code, "5.1.1"
    diagnostic: str  # the remote reply or our reason, one line


def status_code(detail: str, default: str = "5.0.0") -> str:
    """The first RFC 3463 enhanced status code in `detail`, else `default`.

    Only a permanent (5.x.x) code is returned for a failed recipient: a detail such as
    "5.4.7 expired: 451 4.4.1 try later" yields 5.4.7, never the 4.x.x inside it.
    """
    for match in _ENHANCED.finditer(detail):
        if match.group(1) == "5":
            return ".".join(match.groups())
    return default


def failed_recipients(entry: QueueEntry) -> list[FailedRecipient]:
    """The entry's permanently failed recipients, each address once."""
    env = entry.envelope
    originals = (
        env.original_recipients if len(env.original_recipients) == len(env.recipients) else ()
    )
    out: dict[Address, FailedRecipient] = {}
    for i, (rcpt, state) in enumerate(zip(env.recipients, entry.states)):
        if state is not RecipientState.FAILED or rcpt in out:
            continue
        detail = _one_line(entry.details[i]) or "permanent failure"
        out[rcpt] = FailedRecipient(
            final=rcpt,
            original=originals[i] if originals else None,
            status=status_code(detail),
            diagnostic=detail,
        )
    return list(out.values())


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _addr_type(address: Address) -> str:
    # RFC 6533: a UTF-8 address is typed utf-8, an ASCII one rfc822.
    return f"{'utf-8' if address.is_utf8 else 'rfc822'}; {address}"


def _rfc2822_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, localtime=False)


def build_dsn(
    *,
    hostname: str,
    qid: str,
    sender: Address,
    arrival: float,
    now: float,
    recipients: Sequence[FailedRecipient],
    original_headers: bytes,
    boundary: str,
    message_id: str,
) -> bytes:
    """The complete DSN message (CRLF line endings), ready to be written to the spool."""
    crlf = "\r\n"
    postmaster = f"MAILER-DAEMON@{hostname}"
    head = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: {sender}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {_rfc2822_date(now)}",
        f"Message-ID: <{message_id}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    text = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "It is attached below (headers only).",
        "",
        "For further assistance, please contact the postmaster of this host.",
        "",
    ]
    for r in recipients:
        text.append(f"<{r.final}>: {r.diagnostic}")
    per_message = [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Queue-ID: {qid}",
        f"Arrival-Date: {_rfc2822_date(arrival)}",
    ]
    status_groups = []
    for r in recipients:
        group = [f"Final-Recipient: {_addr_type(r.final)}"]
        if r.original is not None:
            group.append(f"Original-Recipient: {_addr_type(r.original)}")
        group += [
            "Action: failed",
            f"Status: {r.status}",
            f"Diagnostic-Code: smtp; {r.diagnostic}",
            f"Last-Attempt-Date: {_rfc2822_date(now)}",
        ]
        status_groups.append(crlf.join(group))
    status = crlf.join(per_message) + crlf + crlf + (crlf + crlf).join(status_groups) + crlf
    headers = _normalize(original_headers)
    parts = [
        crlf.join(head) + crlf + crlf + "This is a MIME-encapsulated message." + crlf,
        f"--{boundary}{crlf}Content-Description: Notification{crlf}"
        f"Content-Type: text/plain; charset=utf-8{crlf}{crlf}" + crlf.join(text) + crlf,
        f"--{boundary}{crlf}Content-Description: Delivery report{crlf}"
        f"Content-Type: message/delivery-status{crlf}{crlf}" + status,
        f"--{boundary}{crlf}Content-Description: Undelivered Message Headers{crlf}"
        f"Content-Type: text/rfc822-headers{crlf}{crlf}",
    ]
    return (
        "".join(p + crlf for p in parts[:-1]).encode("utf-8")
        + parts[-1].encode("utf-8")
        + headers
        + f"{crlf}--{boundary}--{crlf}".encode("ascii")
    )


def _normalize(headers: bytes) -> bytes:
    """Header block with CRLF endings and no trailing blank line."""
    lines = headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    while lines and not lines[-1]:
        lines.pop()
    return b"\r\n".join(lines) + (b"\r\n" if lines else b"")


def read_original_headers(entry: QueueEntry, limit: int = MAX_HEADERS) -> bytes:
    """Blocking: the trace headers plus the header block of the queued body."""
    fd = os.open(entry.path, os.O_RDONLY)
    try:
        data = os.pread(fd, min(entry.body_length, limit), 0)
    finally:
        os.close(fd)
    end = data.find(b"\r\n\r\n")
    if end >= 0:
        data = data[: end + 2]
    elif len(data) == limit:
        data = data[: data.rfind(b"\r\n") + 2] if b"\r\n" in data else b""
    return entry.trace_headers + data


class Bouncer:
    """Writes DSNs into `spool` (an `mta.queue.spool.Spool`); `threadpool` reads the
    original headers off the queue file."""

    def __init__(self, spool, hostname: str, reactor, threadpool):
        self.spool = spool
        self.hostname = hostname
        self.reactor = reactor
        self.threadpool = threadpool

    async def bounce(self, entry: QueueEntry) -> str | None:
        """Queue a DSN for the failed recipients of `entry`; its queue id, or None when
        there is nothing to report.  Never call it for a null sender."""
        sender = entry.envelope.sender
        if sender.is_null:
            raise ValueError(f"{entry.qid}: refusing to bounce a message from the null sender")
        recipients = failed_recipients(entry)
        if not recipients:
            return None
        try:
            headers = await deferToThreadPool(
                self.reactor, self.threadpool, read_original_headers, entry
            )
        except OSError as e:
            log.warn(
                "{qid}: original headers unreadable for the bounce: {error}",
                qid=entry.qid,
                error=str(e),
                event="bounce_headers_missing",
            )
            headers = entry.trace_headers
        now = self.reactor.seconds()
        qid = self.spool.new_queue_id()
        message = build_dsn(
            hostname=self.hostname,
            qid=entry.qid,
            sender=sender,
            arrival=entry.envelope.received_at or entry.created,
            now=now,
            recipients=recipients,
            original_headers=headers,
            boundary=f"{qid}/{self.hostname}",
            message_id=f"{qid}.dsn@{self.hostname}",
        )
        envelope = Envelope(
            sender=NULL_ADDRESS,
            recipients=(sender,),
            helo=self.hostname,
            listener="bounce",
            body=BodyType.SEVEN_BIT if message.isascii() else BodyType.EIGHT_BIT,
            smtputf8=not message.isascii() and sender.is_utf8,
            received_at=now,
        )
        spool_file = self.spool.open(qid)
        try:
            spool_file.write(message)
        except Exception:
            spool_file.abort()
            raise
        await spool_file.commit(envelope, b"")
        log.info(
            "{qid}: bounce {bounce_qid} queued to {sender} for {recipients}",
            qid=entry.qid,
            bounce_qid=qid,
            sender=str(sender),
            recipients=[str(r.final) for r in recipients],
            event="bounced",
        )
        return qid
