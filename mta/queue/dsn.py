"""Delivery status notifications (RFC 3464), honouring the sender's DSN request
(RFC 3461: NOTIFY, RET, ENVID, ORCPT kept in the envelope by the SMTP session).

The queue runner decides *who* is reported, with the pure functions here:

- `failure_reports`: permanently failed recipients (a 5xx reply, or the entry
  outlived `[queue] max_age`) whose NOTIFY asks for failures: no NOTIFY (the
  default) or a list containing FAILURE.  NOTIFY=NEVER, or SUCCESS/DELAY without
  FAILURE, silences the report.
- `delay_reports`: still-deferred recipients whose NOTIFY contains DELAY explicitly.
- `success_reports`: delivered recipients whose NOTIFY contains SUCCESS, with
  Action "delivered" (a local mailbox), or "relayed" (handed to a server that does
  not speak DSN); none when the relay passed the request on to a server that does
  (RFC 3461 5.2.2/5.2.3: that server now owns the success notification).  The relay
  says so with the `dsn_passed` field of its `DeliveryResult`.

`mta.queue.bounce.Bouncer.notify` then writes ONE DSN for the reports it is given and commits it
through the spool like any received message, from the null sender to the original
sender: local or remote delivery then applies to it as to anything else (DESIGN.md:
"bounces re-enter through the spool").  Original-Envelope-Id carries ENVID;
Original-Recipient the ORCPT value when given, else the RCPT TO address the
recipient came from.  A failure DSN returns the headers (RET=HDRS or none), or the
whole message for RET=FULL up to `max_return` bytes (headers only above it, said so
in the text); success and delay notices return headers only.  The message is
copied in chunks on the thread pool, so memory stays bounded.

Loops are impossible by construction: no DSN is ever written for a message whose
sender is null (`notify` refuses; the runner dead-letters such failures).

Who said what (RFC 3464 2.3.5, 2.3.6): a recipient's `details` string in the queue
says it the way the relay writes it.  ``mx.example[192.0.2.1]:25 said: 550 5.1.1
...`` is a remote server's reply: the report gets ``Remote-MTA: dns; mx.example``
and ``Diagnostic-Code: smtp; 550 5.1.1 ...`` (the server's words only).  Anything
else is our own decision (DNS, a refused connection, a timeout, SMTPUTF8 or SIZE
refused before sending, a local mailbox): no Remote-MTA, and ``Diagnostic-Code:
X-mta; ...`` (like Postfix's ``X-Postfix``).  Parsing the status line keeps the
queue's status file format as it was, and records written before this rule are
read the same way.  Dates are UTC written ``+0000`` (``-0000`` would mean "local
time unknown", RFC 5322 3.3).

`build_dsn` is a pure function of its arguments (the `now` and the boundary are
passed in), so the report's structure is tested without a reactor.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence

import attrs

from mta.envelope import Address, RecipientState
from mta.queue.entry import QueueEntry

# Enough for any sane header block; a longer one is cut at a line boundary.
MAX_HEADERS = 64 * 1024
# RET=FULL returns at most this much of the original message (headers only above).
MAX_RETURN = 10 * 1024 * 1024
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# How the relay writes a server's reply into a detail: `host[address]:port said:
# reply`, the host left out when it is only the address; possibly after a prefix
# ending in ": " (an expiry notice quotes the last detail).
_PEER_SAID = re.compile(
    r"(?:^|: )(?P<host>[^\s\[\]:]*)\[(?P<address>[^\]\s]+)\](?::\d+)? said: (?P<reply>[2-5]\d\d\b.*)",
    re.DOTALL,
)
_UNSAFE = re.compile(r"[^\x20-\x7e]")
# Diagnostic-type of the errors we find ourselves (RFC 3464 2.3.6: "smtp" is only
# for what an SMTP server replied).
LOCAL_DIAGNOSTIC = "X-mta"

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"


@attrs.frozen
class FailedRecipient:
    """One per-recipient group of the delivery-status part (any Action, despite the
    historical name: failed, delayed, delivered or relayed).

    `original` is the Original-Recipient: an Address (the RCPT TO it came from) or
    the ORCPT value as received, `type;address`.
    """

    final: Address
    original: Address | str | None
    status: str  # RFC 3463 code, "5.1.1"
    diagnostic: str  # what happened, one line, for people (the text part)
    action: str = FAILED
    will_retry_until: float | None = None  # delayed only
    # The remote server that replied and its reply (one line), when one did: the
    # Remote-MTA and `Diagnostic-Code: smtp;` fields.  None: we decided ourselves.
    remote_mta: str | None = None
    reply: str | None = None


@attrs.frozen
class Diagnosis:
    """Who said a detail: `remote_mta` and its `reply`, or None and None (us)."""

    remote_mta: str | None
    reply: str | None


def diagnosis(detail: str) -> Diagnosis:
    """Split a recipient's detail into the remote server and its own reply, when the
    relay wrote one there (``mx.example[192.0.2.1]:25 said: 550 ...``)."""
    match = _PEER_SAID.search(detail)
    if match is None:
        return Diagnosis(None, None)
    host = match.group("host") or match.group("address")
    return Diagnosis(host, _one_line(match.group("reply")))


ReportedRecipient = FailedRecipient


def status_code(detail: str, default: str = "5.0.0", klass: str = "5") -> str:
    """The first RFC 3463 enhanced status code of class `klass` in `detail`, else
    `default`.

    Only a permanent (5.x.x) code is returned for a failed recipient: a detail such as
    "5.4.7 expired: 451 4.4.1 try later" yields 5.4.7, never the 4.x.x inside it.
    """
    for match in _ENHANCED.finditer(detail):
        if match.group(1) == klass:
            return ".".join(match.groups())
    return default


def notify_words(entry: QueueEntry, index: int) -> frozenset[str] | None:
    """The NOTIFY keywords of recipient `index`, or None when it gave none."""
    notify = entry.envelope.dsn_notify
    if len(notify) != len(entry.envelope.recipients) or not notify[index]:
        return None
    return frozenset(w.strip().upper() for w in notify[index].split(","))


def wants(entry: QueueEntry, index: int, what: str) -> bool:
    """Whether recipient `index` asked for a `what` (FAILURE, DELAY, SUCCESS) notice.
    Without NOTIFY only failures are reported (RFC 3461 4.1)."""
    words = notify_words(entry, index)
    if words is None:
        return what == "FAILURE"
    return what in words and "NEVER" not in words


def _original(entry: QueueEntry, index: int) -> Address | str | None:
    env = entry.envelope
    if len(env.dsn_orcpt) == len(env.recipients) and env.dsn_orcpt[index]:
        return env.dsn_orcpt[index]
    if len(env.original_recipients) == len(env.recipients):
        return env.original_recipients[index]
    return None


def _reports(entry: QueueEntry, indices, action: str, make) -> list[FailedRecipient]:
    out: dict[Address, FailedRecipient] = {}
    for i in indices:
        rcpt = entry.envelope.recipients[i]
        if rcpt not in out:
            out[rcpt] = make(i, rcpt)
    return list(out.values())


def failure_reports(entry: QueueEntry) -> list[FailedRecipient]:
    """The entry's permanently failed recipients that want a failure notice, each
    address once."""

    def make(i, rcpt):
        detail = _one_line(entry.details[i]) or "permanent failure"
        said = diagnosis(detail)
        return FailedRecipient(
            rcpt,
            _original(entry, i),
            status_code(detail),
            detail,
            remote_mta=said.remote_mta,
            reply=said.reply,
        )

    indices = [
        i
        for i, state in enumerate(entry.states)
        if state is RecipientState.FAILED and wants(entry, i, "FAILURE")
    ]
    return _reports(entry, indices, FAILED, make)


def failed_recipients(entry: QueueEntry) -> list[FailedRecipient]:
    """Kept for callers of the first version: the failure reports of `entry`."""
    return failure_reports(entry)


def delay_reports(entry: QueueEntry, retry_until: float) -> list[FailedRecipient]:
    """Deferred recipients that asked for NOTIFY=DELAY, each address once."""

    def make(i, rcpt):
        detail = _one_line(entry.details[i]) or "delivery temporarily deferred"
        said = diagnosis(detail)
        return FailedRecipient(
            rcpt,
            _original(entry, i),
            status_code(detail, "4.0.0", "4"),
            detail,
            DELAYED,
            retry_until,
            remote_mta=said.remote_mta,
            reply=said.reply,
        )

    indices = [
        i
        for i, state in enumerate(entry.states)
        if state not in (RecipientState.DELIVERED, RecipientState.FAILED)
        and wants(entry, i, "DELAY")
    ]
    return _reports(entry, indices, DELAYED, make)


def success_reports(entry: QueueEntry, results: Sequence) -> list[FailedRecipient]:
    """Recipients delivered by `results` (this attempt's DeliveryResults) that asked
    for NOTIFY=SUCCESS.  A result with ``dsn_passed`` True (the relay handed NOTIFY on
    to a DSN-capable server) is not reported; False means relayed to a server without
    DSN (Action: relayed); no such attribute means a final delivery (Action: delivered).
    """
    by_address = {r.recipient: r for r in results if r.state is RecipientState.DELIVERED}
    indices = []
    actions = {}
    for i, rcpt in enumerate(entry.envelope.recipients):
        result = by_address.get(rcpt)
        if result is None or entry.states[i] is not RecipientState.DELIVERED:
            continue
        if not wants(entry, i, "SUCCESS"):
            continue
        passed = result.dsn_passed
        if passed:
            continue
        indices.append(i)
        actions[rcpt] = (RELAYED if passed is False else DELIVERED, result)

    def make(i, rcpt):
        action, result = actions[rcpt]
        # A local delivery's detail names the mailbox file: never show it the sender.
        if action == RELAYED:
            detail = _one_line(result.detail or (str(result.reply) if result.reply else ""))
        else:
            detail = _one_line(str(result.reply)) if result.reply else ""
        remote_mta = getattr(result, "remote_mta", None)
        peer_reply = result.reply if remote_mta is not None else None
        return FailedRecipient(
            rcpt,
            _original(entry, i),
            status_code(detail, "2.0.0", "2"),
            detail or "delivered",
            action,
            remote_mta=remote_mta,
            reply=_one_line(str(peer_reply)) if peer_reply is not None else None,
        )

    return _reports(entry, indices, DELIVERED, make)


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _addr_type(address: Address | str) -> str:
    if isinstance(address, str):  # an ORCPT value: type;address
        addr_type, _, value = address.partition(";")
        return f"{addr_type}; {_one_line(value)}"
    # RFC 6533: a UTF-8 address is typed utf-8, an ASCII one rfc822.
    return f"{'utf-8' if address.is_utf8 else 'rfc822'}; {address}"


def _ascii(text: str) -> str:
    """Text for a field of the (7-bit) delivery-status part: what a remote server
    sent may hold anything; controls and non-ASCII become "?"."""
    return _UNSAFE.sub("?", text)


def _rfc2822_date(timestamp: float) -> str:
    """RFC 5322 date-time in UTC, written ``+0000`` (formatdate's ``-0000`` says the
    local time is unknown, RFC 5322 3.3)."""
    return email.utils.formatdate(timestamp, localtime=False)[:-5] + "+0000"


HEADERS = "headers"  # text/rfc822-headers
FULL = "full"  # message/rfc822, the whole message
TOO_BIG = "too-big"  # RET=FULL asked, but the message exceeds max_return: headers

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}


def _summary(recipients: Sequence[FailedRecipient], returned: str, size: int) -> list[str]:
    actions = {r.action for r in recipients}
    lines = []
    if FAILED in actions:
        lines.append("Your message could not be delivered to one or more recipients.")
    if DELAYED in actions:
        until = min(r.will_retry_until or 0.0 for r in recipients if r.action == DELAYED)
        lines += [
            "Your message could not be delivered yet to one or more recipients.",
            f"Delivery will be retried until {_rfc2822_date(until)}; you do not need",
            "to send it again.",
        ]
    if DELIVERED in actions:
        lines.append("Your message was delivered to the mailbox of one or more recipients.")
    if RELAYED in actions:
        lines += [
            "Your message was relayed to one or more recipients whose next mail server",
            "does not report delivery; you may receive no further notice for them.",
        ]
    if returned == FULL:
        lines.append("It is attached below.")
    elif returned == TOO_BIG:
        lines += [
            f"It is too large ({size} bytes) to be returned in full, so only its",
            "headers are attached below.",
        ]
    else:
        lines.append("Its headers are attached below.")
    return lines


def dsn_frame(
    *,
    hostname: str,
    qid: str,
    sender: Address,
    arrival: float,
    now: float,
    recipients: Sequence[FailedRecipient],
    boundary: str,
    message_id: str,
    envid: str | None = None,
    returned: str = HEADERS,
    original_size: int = 0,
) -> tuple[bytes, bytes]:
    """The DSN up to the returned content, and what follows it (CRLF line endings).

    The caller puts the original between them: its header block (CRLF, no blank
    line at the end) for HEADERS and TOO_BIG, the whole message for FULL.
    """
    crlf = "\r\n"
    postmaster = f"MAILER-DAEMON@{hostname}"
    actions = [r.action for r in recipients]
    worst = next((a for a in (FAILED, DELAYED, DELIVERED, RELAYED) if a in actions), FAILED)
    head = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: {sender}",
        f"Subject: {_SUBJECTS[worst]}",
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
        *_summary(recipients, returned, original_size),
        "",
        "For further assistance, please contact the postmaster of this host.",
        "",
    ]
    for r in recipients:
        text.append(f"<{r.final}>: {r.action}: {r.diagnostic}")
    per_message = [f"Reporting-MTA: dns; {hostname}"]
    if envid:
        per_message.append(f"Original-Envelope-Id: {_one_line(envid)}")
    per_message += [f"X-Queue-ID: {qid}", f"Arrival-Date: {_rfc2822_date(arrival)}"]
    status_groups = []
    for r in recipients:
        # RFC 3464 2.3's order: Original-Recipient, Final-Recipient, Action, Status,
        # Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until.
        group = []
        if r.original is not None:
            group.append(f"Original-Recipient: {_addr_type(r.original)}")
        group += [
            f"Final-Recipient: {_addr_type(r.final)}",
            f"Action: {r.action}",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            group.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        if r.action in (FAILED, DELAYED):
            if r.reply:
                group.append(f"Diagnostic-Code: smtp; {_ascii(r.reply)}")
            elif r.diagnostic:
                group.append(f"Diagnostic-Code: {LOCAL_DIAGNOSTIC}; {_ascii(r.diagnostic)}")
        group.append(f"Last-Attempt-Date: {_rfc2822_date(now)}")
        if r.action == DELAYED and r.will_retry_until is not None:
            group.append(f"Will-Retry-Until: {_rfc2822_date(r.will_retry_until)}")
        status_groups.append(crlf.join(group))
    status = crlf.join(per_message) + crlf + crlf + (crlf + crlf).join(status_groups) + crlf
    if returned == FULL:
        last = f"Content-Description: Undelivered Message{crlf}Content-Type: message/rfc822"
    elif FAILED in actions:
        last = f"Content-Description: Undelivered Message Headers{crlf}Content-Type: text/rfc822-headers"
    else:
        last = f"Content-Description: Message Headers{crlf}Content-Type: text/rfc822-headers"
    parts = [
        crlf.join(head) + crlf + crlf + "This is a MIME-encapsulated message." + crlf,
        f"--{boundary}{crlf}Content-Description: Notification{crlf}"
        f"Content-Type: text/plain; charset=utf-8{crlf}{crlf}" + crlf.join(text) + crlf,
        f"--{boundary}{crlf}Content-Description: Delivery report{crlf}"
        f"Content-Type: message/delivery-status{crlf}{crlf}" + status,
        f"--{boundary}{crlf}{last}{crlf}{crlf}",
    ]
    front = "".join(p + crlf for p in parts[:-1]) + parts[-1]
    return front.encode("utf-8"), f"{crlf}--{boundary}--{crlf}".encode("ascii")


def build_dsn(*, original_headers: bytes, **kwargs) -> bytes:
    """The complete DSN with the original's headers attached (see `dsn_frame`)."""
    front, back = dsn_frame(**kwargs)
    return front + normalize_headers(original_headers) + back


def normalize_headers(headers: bytes) -> bytes:
    """Header block with CRLF endings and no trailing blank line."""
    lines = headers.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    while lines and not lines[-1]:
        lines.pop()
    return b"\r\n".join(lines) + (b"\r\n" if lines else b"")
