"""The seams between stages, as zope interfaces.

Each stage depends only on these, so a backend is chosen by configuration and a test
can swap in another real implementation or a fake from `mta.testing`.
Methods documented as *blocking* run on a thread pool owned by the caller; every
other method returns a value or a Deferred and never blocks the reactor.

| seam            | owner          | first implementation                   |
|-----------------|----------------|----------------------------------------|
| `ISpool`        | mta.queue      | the receiving side of `IQueueStore`    |
| `IMessageBody`  | mta.queue      | `mta.queue.body.FileBody`              |
| `IQueueStore`   | mta.queue      | `mta.queue.filestore.FileQueueStore`   |
| `IQueueControl` | mta.queue      | `mta.queue.control.FileQueueControl`   |
| `IPolicyCheck`  | mta.policy     | relay rule, sender rule, rate limits   |
| `IDeliveryAgent`| mta.delivery   | local delivery, outbound relay, router |
| `IMailStore`    | mta.storage    | `mta.storage.maildir.MaildirStore`     |
| `IUserDirectory`| mta.db.directory  | `mta.db.directory.UserDirectory`          |
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# -- receiving: the session hands a message to the queue ------------------------------


class ISpoolFile(Interface):
    """One message being received: chunks stream in, then commit or abort.

    The session writes the message body (already dot-unstuffed, CRLF line endings) as
    it arrives; memory stays bounded because large bodies spill to a file.
    """

    size = Attribute("Number of body bytes written so far.")

    def write(data: bytes) -> None:
        """Append body bytes (never blocks on fsync)."""

    def body():
        """An `IMessageBody` over the bytes written so far, for end-of-message checks
        that must see the whole message before the 250 (no trace headers yet).  Valid
        until `commit` or `abort`; nothing may be written while it is in use."""

    def commit(envelope, trace_headers: bytes):
        """Make the message durable; Deferred firing with the queue id.

        Fires only after the message and its metadata are durable (fsynced file and
        directory, or a committed database transaction).  `trace_headers` (the
        Received header, and any header a check added) are prepended to the stored
        message.
        """

    def abort() -> None:
        """Discard everything written; the spool file leaves no trace."""


class ISpool(Interface):
    """The durable incoming queue, as the SMTP session sees it."""

    def open(queue_id: str):
        """Start a new message; returns an `ISpoolFile`."""

    def new_queue_id() -> str:
        """A fresh, unique, sortable queue id (also used in the Received header)."""

    def backlog() -> int:
        """Messages accepted but not yet finished by delivery (for flow control)."""


# -- the queue: what delivery and operators see ---------------------------------------


class IMessageBody(Interface):
    """A queued message, sealed: the only way anything outside the queue reads one.

    What it yields is the message as it is delivered: the trace headers the queue
    stored with it, then the body as received.  All methods block.
    """

    size = Attribute("Bytes of the whole message (trace headers and body).")

    def header_block(limit: int = 65536) -> bytes:
        """The header section (up to and including the CRLF that ends the last header
        line, without the empty line), at most `limit` bytes cut at a line end."""

    def chunks(chunk_size: int = 262144):
        """An iterator over the whole message in chunks of at most `chunk_size` bytes.
        Closing the iterator releases what it holds open."""

    def copy_into(fd: int, prefix: bytes = b"") -> int:
        """Write `prefix` (a store's own headers) then the whole message at the current
        offset of file descriptor `fd`, the cheapest way this body can (one writev
        from memory, or copy_file_range); returns the number of bytes written.  Raises
        OSError when the stored message is shorter than recorded."""


class IQueueStore(ISpool):
    """Where accepted messages wait for delivery: commit, claim, record, finish.

    The queue runner is its only client on the delivery side; it decides *what*
    happens to a message (retry schedule, bounces, dead letters), the store decides
    *where* that is kept and *which* message is due.  An entry the store hands out by
    `claim` is leased to this process until `defer`, `finish` or `bury` returns it.
    Entries are `mta.queue.entry.QueueEntry` objects: the runner's working copy.
    """

    on_ready = Attribute(
        "Callable() the store calls when a claim may find work (a commit, a release, a"
        " retry time that came); set by the runner, None when nobody listens."
    )

    def recover():
        """Deferred firing (with the number of entries found) once the store has found
        what an earlier process left; claims may return those afterwards."""

    def claim(limit: int):
        """Deferred with up to `limit` due entries (possibly fewer, possibly none),
        fresh commits first, each leased to this process."""

    def defer(entry, next_attempt: float):
        """Durably record `entry`'s per-recipient state and attempt count, and keep it
        until `next_attempt` (a time on the store's clock); the lease ends."""

    def finish(entry):
        """Every recipient of `entry` is done: remove it (Deferred)."""

    def bury(entry, reason: str):
        """Keep `entry` as a dead letter with `reason` (Deferred)."""

    def depth() -> dict:
        """Counts by state (incoming, active, ready, deferred) for metrics."""

    def stop() -> None:
        """The runner stops: hand out no more work and arm no timers (leases held now
        still end with `defer`, `finish` or `bury`)."""

    def wait_idle():
        """Deferred firing when no write of the store is in flight (orderly stop)."""

    def probe() -> str:
        """Blocking readiness probe: prove a message could be committed now; raises
        (OSError or the backend's error) saying why not."""


class IQueueControl(Interface):
    """Operator actions on a queue, for `mta-admin queue ...` and the manhole.

    Blocking: the CLI calls them directly, the server on a thread pool.  Every method
    raises `mta.queue.control.ControlError` with a message an operator can act on.
    """

    def list(dead=None) -> list:
        """`mta.queue.record.EntrySummary` for every entry, oldest first; `dead`: None
        for all, True for dead letters only, False for the live queue only."""

    def show(qid: str) -> str:
        """A human-readable description: envelope, per-recipient states, headers."""

    def act(action: str, qid=None) -> str:
        """Carry out flush, retry, hold, release, delete or requeue; a message saying
        what happened."""


# -- delivery -------------------------------------------------------------------------


class IDeliveryAgent(Interface):
    """Delivers one queued message to some of its recipients."""

    def deliver(job, recipients):
        """Deferred firing with a list of `DeliveryResult`, one per recipient.

        `job` is an `mta.envelope.DeliveryJob`: an immutable view of the queued
        message (envelope, `IMessageBody`, per-recipient state), never the queue's
        entry or a file path."""


class IUserDirectory(Interface):
    """Local users and aliases."""

    def resolve(address):
        """Deferred (or immediate value) with a tuple of mailbox addresses
        (`mta.envelope.Address`) that mail for `address` goes to, or an empty tuple
        when no such local user or alias exists."""

    def quota_usage(mailboxes):
        """`{mailbox: (quota, used)}` in bytes for those of `mailboxes` (final
        mailboxes, as `resolve` gives them) that have a quota; a dict, or a Deferred
        firing with one.  Mailboxes without a quota are left out."""


class IMailStore(Interface):
    """Where local mail ends up (Maildir, mbox, SQL, ...).  All methods block.

    Stores are chosen by `[storage] backend` through `mta.storage.open_store`; local
    delivery, the health probe and `mta-admin` use nothing but this interface.
    """

    name = Attribute("The backend's name, as `[storage] backend` spells it.")

    def deliver_batch(items) -> list:
        """Store each `mta.storage.StoreItem` durably (its `prefix`, then its body);
        one outcome per item, in order: where it was stored (a string) or the
        exception that stopped it.  Never raises for one item.  An item with
        `check_existing` whose `message_tag` is already in the mailbox is not stored
        again (a crash between the store and the queue's record)."""

    def has_delivered(mailbox, message_tag: str) -> bool:
        """True when a message with `message_tag` is already in `mailbox`."""

    def create_mailbox(mailbox) -> str | None:
        """Make `mailbox` ready to receive; where it lives, or None when the backend
        needs nothing made.  Raises `mta.storage.UnsafeMailboxName`."""

    def remove_mailbox(mailbox) -> bool:
        """Delete `mailbox` and everything in it; False when there was none."""

    def probe() -> str:
        """Readiness: prove the store can take a message now; raises OSError (or the
        backend's error) saying why not, else returns a short description."""

    def list_messages(mailbox) -> list:
        """`mta.storage.StoredMessage` for each message in `mailbox`, oldest first."""

    def read_message(mailbox, message_id: str) -> bytes:
        """The stored message, exactly as stored.  Raises KeyError when unknown."""

    def delete_message(mailbox, message_id: str) -> None:
        """Delete one message.  Raises KeyError when unknown."""


# -- policy ---------------------------------------------------------------------------


class IPolicyCheck(Interface):
    """One policy rule, asked at the SMTP phases it names.

    `mta.policy.pipeline.PolicyPipeline` runs the checks of a phase in order, each
    under a timeout, and the session makes one call per phase.  A check returns a
    `mta.policy.verdict.Verdict` or a Deferred firing with one; the first REJECT,
    TEMPFAIL or DISCARD ends the phase.  A check that answers synchronously costs no
    Deferred: return the verdict itself (`Verdict.ACCEPT` for "fine").  A check never
    blocks the reactor (lookups go through a thread pool or are asynchronous); if it
    raises, hangs or fails, the pipeline turns that into a 451 (or skips it, failing
    open), never a 5xx.
    """

    name = Attribute("Short name for logs, metrics and timeouts ('relay', 'spf').")
    phases = Attribute("The `mta.policy.verdict.Phase` members this check runs at.")

    def check(phase, context):
        """The verdict for `context` (an `mta.policy.verdict.PolicyContext`) at
        `phase`: a Verdict, or a Deferred firing with one."""
