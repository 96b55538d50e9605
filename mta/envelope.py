"""Value types that pass between the stages: addresses, envelopes, replies, results.

These are the only objects that cross from the SMTP session to the queue and from the
queue to delivery, so they are frozen and carry no behaviour beyond parsing and
rendering.  Address parsing follows RFC 5321 section 4.1.2 strictly, because relay
decisions are made on its output: an address we cannot parse unambiguously is refused.
"""

from __future__ import annotations

import enum
import ipaddress
import re

import attrs

# RFC 5321 4.1.2 / RFC 5322 3.2.3 atext, plus UTF-8 for SMTPUTF8 (RFC 6531 3.3).
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
_ATOM_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*\Z")
_LABEL_ASCII = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_LABEL_UTF8 = re.compile(
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?\Z"
)
_QTEXT = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]")
_NEEDS_QUOTES = re.compile(rf"[^{_ATEXT}.\u0080-\U0010ffff]")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """An address that is not a valid RFC 5321 path; the message says why."""


@attrs.frozen
class Address:
    """A mailbox `local@domain`, or the null reverse-path when both are empty.

    `local` is the local part with quoting removed (so `"a b"@x` has local `a b`);
    `domain` is lower-cased, or an address literal such as `[192.0.2.1]`.
    """

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def is_utf8(self) -> bool:
        return not (self.local.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        if self.is_null:
            return ""
        local = self.local
        if (
            not local
            or _NEEDS_QUOTES.search(local)
            or ".." in local
            or local[0] == "."
            or local[-1] == "."
        ):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if not self.domain:
            return local
        return f"{local}@{self.domain}"

    @property
    def path(self) -> str:
        """The address as it appears in MAIL/RCPT and Return-Path: `<a@b>` or `<>`."""
        return f"<{self}>"


NULL_ADDRESS = Address("", "")


def parse_path(text: str, *, utf8: bool = False, allow_null: bool = False) -> Address:
    """Parse an RFC 5321 Path (`<a@b>`, `<@route:a@b>`, `<>`), returning its mailbox.

    Source routes are accepted and ignored (RFC 5321 4.1.2, C.  The mailbox after
    the route is the one we deliver to, so `<@local:user@other>` is a mail for
    `other`).  `<postmaster>` without a domain is returned with an empty domain;
    callers decide whether they accept it (only RCPT does).
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError("address must be enclosed in <>")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return NULL_ADDRESS
        raise AddressError("null address not allowed here")
    if len(inner) > MAX_PATH:
        raise AddressError("path too long")
    if inner[0] == "@":
        route, sep, inner = inner.partition(":")
        if not sep:
            raise AddressError("source route without a mailbox")
        for hop in route.split(","):
            if not hop.startswith("@") or not _valid_domain(hop[1:], utf8):
                raise AddressError("malformed source route")
    if not utf8 and not inner.isascii():
        raise AddressError("non-ASCII address requires SMTPUTF8")
    if inner.lower() == "postmaster":
        return Address("postmaster", "")
    return parse_mailbox(inner, utf8=utf8)


def parse_mailbox(text: str, *, utf8: bool = False) -> Address:
    """Parse `local@domain` (no angle brackets); the domain is lower-cased."""
    if text.startswith('"'):
        local, rest = _parse_quoted(text)
        if not rest.startswith("@"):
            raise AddressError("expected @ after quoted local part")
        domain = rest[1:]
    else:
        local, sep, domain = text.rpartition("@")
        if not sep:
            raise AddressError("address lacks a domain")
        pattern = _ATOM_UTF8 if utf8 else _ATOM_ASCII
        if not pattern.match(local):
            raise AddressError("invalid local part")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if domain.startswith("["):
        domain = _parse_literal(domain)
    elif not _valid_domain(domain, utf8):
        raise AddressError("invalid domain")
    return Address(local, domain.lower())


def _parse_quoted(text: str) -> tuple[str, str]:
    out = []
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == '"':
            return "".join(out), text[i + 1 :]
        if ch == "\\":
            i += 1
            if i >= len(text) or not ("\x20" <= text[i] <= "\x7e"):
                raise AddressError("invalid quoted-pair")
            out.append(text[i])
        elif _QTEXT.match(ch):
            out.append(ch)
        else:
            raise AddressError("invalid character in quoted string")
        i += 1
    raise AddressError("unterminated quoted string")


def _valid_domain(domain: str, utf8: bool) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    label = _LABEL_UTF8 if utf8 else _LABEL_ASCII
    return all(label.match(part) for part in domain.split("."))


def _parse_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise AddressError("unterminated address literal")
    body = domain[1:-1]
    try:
        if body[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise AddressError("invalid address literal") from None


@attrs.frozen
class Reply:
    """One SMTP reply: `code`, RFC 3463 enhanced status, text (lines joined by \\n)."""

    code: int
    enhanced: str
    text: str

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    def to_bytes(self) -> bytes:
        lines = self.text.split("\n")
        prefix = f"{self.code} {self.enhanced} " if self.enhanced else f"{self.code} "
        if len(lines) == 1:
            return (prefix + lines[0] + "\r\n").encode("utf-8")
        cont = f"{self.code}-{self.enhanced} " if self.enhanced else f"{self.code}-"
        out = [cont + line for line in lines[:-1]]
        out.append(prefix + lines[-1])
        return ("\r\n".join(out) + "\r\n").encode("utf-8")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class BodyType(enum.Enum):
    SEVEN_BIT = "7BIT"
    EIGHT_BIT = "8BITMIME"
    BINARY = "BINARYMIME"


@attrs.frozen
class Envelope:
    """What the session hands to the spool: one transaction, any number of recipients."""

    sender: Address
    recipients: tuple[Address, ...]
    # The RCPT TO address each recipient came from (alias expansion happens at RCPT
    # time); same length as `recipients`, or empty when none was rewritten.
    original_recipients: tuple[Address, ...] = ()
    helo: str = ""
    client_address: str = ""
    client_name: str = ""
    authenticated_as: str | None = None
    listener: str = ""
    tls: str | None = None
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    received_at: float = 0.0
    # DSN (RFC 3461): RET and ENVID from MAIL; NOTIFY and ORCPT per recipient, parallel
    # to `recipients` ("" where the client gave none), or empty when no RCPT had any.
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    dsn_notify: tuple[str, ...] = ()
    dsn_orcpt: tuple[str, ...] = ()
    # Why a policy check quarantined the message (kept away from its recipients, see
    # `mta.policy.verdict.Action.QUARANTINE`), or None for a normal message.
    quarantine: str | None = None


def envelope_fields(e: Envelope) -> dict:
    """`e` as JSON-able fields (the queue's metadata and the quarantine's sidecar
    store envelopes this way); `envelope_from_fields` reads them back."""
    fields = {
        "sender": [e.sender.local, e.sender.domain],
        "recipients": [[r.local, r.domain] for r in e.recipients],
        "original_recipients": [[r.local, r.domain] for r in e.original_recipients],
        "helo": e.helo,
        "client_address": e.client_address,
        "client_name": e.client_name,
        "authenticated_as": e.authenticated_as,
        "listener": e.listener,
        "tls": e.tls,
        "body": e.body.value,
        "smtputf8": e.smtputf8,
        "received_at": e.received_at,
    }
    if e.dsn_ret or e.dsn_envid or e.dsn_notify or e.dsn_orcpt:
        fields["dsn"] = {
            "ret": e.dsn_ret,
            "envid": e.dsn_envid,
            "notify": list(e.dsn_notify),
            "orcpt": list(e.dsn_orcpt),
        }
    if e.quarantine is not None:
        fields["quarantine"] = e.quarantine
    return fields


def envelope_from_fields(fields: dict) -> Envelope:
    """The envelope `envelope_fields` wrote; KeyError, TypeError, ValueError or
    IndexError when the fields are not such."""

    def address(v) -> Address:
        return Address(str(v[0]), str(v[1]))

    dsn = fields.get("dsn") or {}
    return Envelope(
        sender=address(fields["sender"]),
        recipients=tuple(address(r) for r in fields["recipients"]),
        original_recipients=tuple(address(r) for r in fields.get("original_recipients", ())),
        helo=fields.get("helo", ""),
        client_address=fields.get("client_address", ""),
        client_name=fields.get("client_name", ""),
        authenticated_as=fields.get("authenticated_as"),
        listener=fields.get("listener", ""),
        tls=fields.get("tls"),
        body=BodyType(fields.get("body", "7BIT")),
        smtputf8=bool(fields.get("smtputf8", False)),
        received_at=float(fields.get("received_at", 0.0)),
        dsn_ret=dsn.get("ret"),
        dsn_envid=dsn.get("envid"),
        dsn_notify=tuple(str(n) for n in dsn.get("notify", ())),
        dsn_orcpt=tuple(str(o) for o in dsn.get("orcpt", ())),
        quarantine=fields.get("quarantine"),
    )


class RecipientState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"


@attrs.frozen
class DeliveryResult:
    """The outcome of one delivery attempt to one recipient.

    `state` distinguishes a 5xx-style failure (bounce) from a transient one (retry);
    `reply` is the reply that decided it, and `detail` says it for people (logs, the
    queue's status file, the text of a DSN).
    """

    recipient: Address
    state: RecipientState
    detail: str = ""
    reply: Reply | None = None
    # What DSNs need from the outbound relay (RFC 3461): None for a final delivery
    # (a local mailbox), True when the next server took the DSN request on (it now
    # owns success notices), False when it does not speak DSN ("relayed").
    dsn_passed: bool | None = None
    # The name of the remote server whose own words `reply` is (a DSN's Remote-MTA,
    # RFC 3464 2.3.5): set only when a peer said it; None when we decided ourselves
    # (DNS, connection, timeout, a policy of ours) or delivered locally.
    remote_mta: str | None = None

    @property
    def peer_reply(self) -> Reply | None:
        """The remote server's reply (a DSN's `Diagnostic-Code: smtp;`), or None
        when no peer said it."""
        return self.reply if self.remote_mta is not None else None

    @classmethod
    def delivered(cls, recipient: Address, detail: str = "") -> DeliveryResult:
        return cls(recipient, RecipientState.DELIVERED, detail)

    @classmethod
    def deferred(cls, recipient: Address, detail: str) -> DeliveryResult:
        return cls(recipient, RecipientState.DEFERRED, detail)

    @classmethod
    def failed(cls, recipient: Address, detail: str) -> DeliveryResult:
        return cls(recipient, RecipientState.FAILED, detail)


@attrs.frozen
class DeliveryJob:
    """One delivery attempt of a queued message, as delivery sees it: immutable.

    `body` is the queue's `IMessageBody` (the only way to read the message);
    `states` runs parallel to `envelope.recipients`.  `may_be_delivered` is true when
    an earlier attempt (or a process that died) may have stored a copy without the
    queue recording it, so stores check `message_tag` before storing again.
    """

    qid: str
    envelope: Envelope
    body: object  # IMessageBody
    states: tuple[RecipientState, ...] = ()
    attempts: int = 0
    may_be_delivered: bool = False

    @property
    def size(self) -> int:
        return self.body.size

    def message_tag(self, recipient: Address) -> str:
        """Unique per (queue id, recipient): how a store recognises a copy it has."""
        return f"{self.qid}-{self.envelope.recipients.index(recipient)}"
