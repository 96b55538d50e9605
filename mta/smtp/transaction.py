"""`Transaction`: the state of one mail transaction, from MAIL FROM to the end of DATA.

The session starts one at MAIL (after the MAIL checks said yes) and drops it at RSET,
HELO/EHLO, STARTTLS or the end of the message.  It collects the accepted recipients
(with their RCPT TO address and DSN parameters), the policy verdicts that carry
something for the message (headers, a quarantine reason, a discard), the message
body being received, and finally builds the `Envelope` that goes to the spool.
"""

from __future__ import annotations

import attrs

from mta.envelope import Address, Envelope
from mta.policy.verdict import Verdict
from mta.smtp.params import MailParams


@attrs.define(slots=True, eq=False)
class Transaction:
    sender: Address
    params: MailParams
    started_at: float
    recipients: list[Address] = attrs.Factory(list)
    originals: list[Address] = attrs.Factory(list)  # the RCPT TO each came from
    notify: list[str] = attrs.Factory(list)
    orcpt: list[str] = attrs.Factory(list)
    dsn_used: bool = False
    rcpt_count: int = 0  # accepted RCPT commands (an alias counts once)
    verdicts: list[Verdict] = attrs.Factory(list)
    message: object | None = None  # mta.smtp.message.IncomingMessage once DATA/BDAT began

    def add_recipient(self, rcpt: Address, mailboxes, notify: str, orcpt: str) -> None:
        """One accepted RCPT TO `rcpt`, resolved to `mailboxes` (duplicates dropped)."""
        self.rcpt_count += 1
        for mailbox in mailboxes:
            if mailbox not in self.recipients:
                self.recipients.append(mailbox)
                self.originals.append(rcpt)
                self.notify.append(notify)
                self.orcpt.append(orcpt)
                if notify or orcpt:
                    self.dsn_used = True

    def envelope(
        self,
        helo: str,
        client_address: str,
        authenticated_as: str | None,
        listener: str,
        tls: str | None,
        received_at: float,
    ) -> Envelope:
        """The envelope for the spool, with the connection's side given."""
        params = self.params
        return Envelope(
            sender=self.sender,
            recipients=tuple(self.recipients),
            original_recipients=tuple(self.originals),
            helo=helo,
            client_address=client_address,
            authenticated_as=authenticated_as,
            listener=listener,
            tls=tls,
            body=params.body,
            smtputf8=params.smtputf8,
            received_at=received_at,
            dsn_ret=params.ret,
            dsn_envid=params.envid,
            dsn_notify=tuple(self.notify) if self.dsn_used else (),
            dsn_orcpt=tuple(self.orcpt) if self.dsn_used else (),
        )
