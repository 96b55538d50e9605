"""The seams between stages, as zope interfaces.

Each stage depends only on these, so a backend is chosen by configuration and a test
can swap in another real implementation or a fake from `mta.testing`.
Methods documented as *blocking* run on a thread pool owned by the caller; every
other method returns a value or a Deferred and never blocks the reactor.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISpoolFile(Interface):
    """One message being received: chunks stream in, then commit or abort.

    The session writes the message body (already dot-unstuffed, CRLF line endings) as
    it arrives; memory stays bounded because large bodies spill to a file.
    """

    size = Attribute("Number of body bytes written so far.")

    def write(data: bytes) -> None:
        """Append body bytes (never blocks on fsync)."""

    def commit(envelope, trace_headers: bytes):
        """Make the message durable; Deferred firing with the queue id.

        Fires only after the message file and its metadata are fsynced and renamed
        into the queue directory and the directory is fsynced.  `trace_headers`
        (the Received header) is prepended to the stored message.
        """

    def abort() -> None:
        """Discard everything written; the spool file leaves no trace."""


class ISpool(Interface):
    """The durable incoming queue."""

    def open(queue_id: str):
        """Start a new message; returns an `ISpoolFile`."""

    def new_queue_id() -> str:
        """A fresh, unique, sortable queue id (also used in the Received header)."""

    def backlog() -> int:
        """Messages accepted but not yet finished by delivery (for flow control)."""


class IMailbox(Interface):
    """A local mailbox resolved from an address (user or alias target)."""

    domain = Attribute("Domain part, lower-case.")
    local = Attribute("Local part, lower-case, validated safe for a path name.")


class IUserDirectory(Interface):
    """Local users and aliases."""

    def resolve(address):
        """Deferred (or immediate value) with a tuple of mailbox addresses
        (`mta.envelope.Address`) that mail for `address` goes to, or an empty tuple
        when no such local user or alias exists."""


class IMailStore(Interface):
    """Where local mail ends up (Maildir, mbox, ...). All methods are blocking."""

    def deliver(mailbox, message_tag: str, prefix: bytes, source_path: str, length: int) -> str:
        """Store `prefix` + the first `length` bytes of `source_path` durably in
        `mailbox` (an Address); returns the stored location.  `message_tag` is unique
        per (queue id, recipient) so a delivery interrupted by a crash is detected
        by `has_delivered` and never repeated."""

    def has_delivered(mailbox, message_tag: str) -> bool:
        """True when a message with `message_tag` is already in `mailbox`."""

    def ensure_mailbox(mailbox) -> None:
        """Create the mailbox if it does not exist."""


class IDeliveryAgent(Interface):
    """Delivers one queued message to some of its recipients."""

    def deliver(entry, recipients):
        """Deferred firing with a list of `DeliveryResult`, one per recipient."""
