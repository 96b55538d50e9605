"""What crosses the policy seam: phases, verdicts and the context a check looks at.

Pure values (they import nothing but `mta.envelope`), so a check, the pipeline and
the SMTP session share one small vocabulary, Haraka's in spirit:

- a check says ACCEPT (this check is content; an RCPT check names the mailboxes the
  recipient resolves to), CONTINUE (no opinion), REJECT (a 5xx), TEMPFAIL (a 4xx),
  QUARANTINE (take the message but keep it away from its recipients, with a reason)
  or DISCARD (answer success and drop the message);
- any verdict may carry header fields to add to the message.

`Verdict.ACCEPT` and `Verdict.CONTINUE` are shared constants: the common answer of a
synchronous check costs no allocation.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, NamedTuple

import attrs

from mta.envelope import Address, BodyType, Reply


class Phase(enum.Enum):
    """The SMTP phases a check can run at (DATA means the end of the message)."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4


class Action(enum.Enum):
    CONTINUE = "continue"  # no opinion: ask the next check
    ACCEPT = "accept"  # fine by this check (may carry recipients and headers)
    REJECT = "reject"  # permanent refusal: the verdict's 5xx reply
    TEMPFAIL = "tempfail"  # temporary refusal: the verdict's 4xx reply
    QUARANTINE = "quarantine"  # accept, but hold the message away from its recipients
    DISCARD = "discard"  # answer success, then drop the message


# Actions that end a phase: the first check answering one of these decides.
FINAL_ACTIONS = frozenset((Action.REJECT, Action.TEMPFAIL, Action.DISCARD))
_REJECT, _TEMPFAIL = Action.REJECT, Action.TEMPFAIL


@attrs.frozen(slots=True)
class Verdict:
    """One check's answer, or the pipeline's combined answer for a phase.

    `reply` is what the client is told for REJECT and TEMPFAIL (required there); an
    ACCEPT may carry the success reply (the relay check's `250 2.1.5 Ok`), otherwise
    the session answers its own.  `headers` are complete header fields, each ending
    in CRLF (folded lines allowed), prepended to the message at the end of DATA.
    `recipients` is, for an RCPT ACCEPT, the final mailboxes the recipient resolves
    to (alias expansion).  `reason` says why, for logs and the quarantine.
    """

    action: Action
    reply: Reply | None = None
    headers: tuple[bytes, ...] = ()
    recipients: tuple[Address, ...] = ()
    reason: str = ""

    ACCEPT: ClassVar[Verdict]
    CONTINUE: ClassVar[Verdict]

    @property
    def refuses(self) -> bool:
        """True for REJECT and TEMPFAIL: the client is told no."""
        action = self.action
        return action is _REJECT or action is _TEMPFAIL

    @classmethod
    def accept(
        cls,
        *,
        reply: Reply | None = None,
        recipients: tuple[Address, ...] = (),
        headers: tuple[bytes, ...] = (),
        reason: str = "",
    ) -> Verdict:
        if not (reply or recipients or headers or reason):
            return cls.ACCEPT
        return cls(Action.ACCEPT, reply, tuple(headers), tuple(recipients), reason)

    @classmethod
    def continue_(cls, *, headers: tuple[bytes, ...] = ()) -> Verdict:
        """No opinion (optionally with header fields to add, e.g. a tag)."""
        if not headers:
            return cls.CONTINUE
        return cls(Action.CONTINUE, None, tuple(headers))

    @classmethod
    def reject(cls, reply: Reply, reason: str = "") -> Verdict:
        if reply.code < 500:
            raise ValueError(f"a rejection needs a 5xx reply, got {reply.code}")
        return cls(Action.REJECT, reply, reason=reason or reply.text)

    @classmethod
    def tempfail(cls, reply: Reply, reason: str = "") -> Verdict:
        if not reply.is_transient:
            raise ValueError(f"a temporary failure needs a 4xx reply, got {reply.code}")
        return cls(Action.TEMPFAIL, reply, reason=reason or reply.text)

    @classmethod
    def quarantine(cls, reason: str, *, headers: tuple[bytes, ...] = ()) -> Verdict:
        return cls(Action.QUARANTINE, None, tuple(headers), reason=reason)

    @classmethod
    def discard(cls, reason: str) -> Verdict:
        return cls(Action.DISCARD, None, reason=reason)


Verdict.ACCEPT = Verdict(Action.ACCEPT)
Verdict.CONTINUE = Verdict(Action.CONTINUE)


class PolicyContext(NamedTuple):
    """What a check may look at, as of the phase it is asked at.

    Built by the session only for phases that have checks (a NamedTuple: immutable
    and cheap to make, on the hot path).  `recipient` is the RCPT being decided (RCPT
    phase); `recipients` the mailboxes accepted so far in this transaction.  At
    DATA, `body` is the sealed `IMessageBody` of the message as received (no trace
    headers yet; its methods block, so read it in a thread) and `size` its size; at
    MAIL and RCPT `size` is the client's SIZE= declaration or 0.
    """

    client_address: str
    listener: str
    session_id: str = ""
    helo: str | None = None
    esmtp: bool = False
    tls: str | None = None  # the negotiated TLS description, None in plaintext
    authenticated_as: str | None = None
    sender: Address | None = None
    recipient: Address | None = None
    recipients: tuple[Address, ...] = ()
    body_type: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    queue_id: str | None = None
    size: int = 0
    body: Any = None  # IMessageBody, at DATA only
