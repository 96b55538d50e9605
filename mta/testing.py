"""Test doubles for the seams in `mta.interfaces`, shipped with the package (like
`treq.testing`) so every test and every downstream user fakes the same way."""

from __future__ import annotations

import attrs
from twisted.internet import defer
from zope.interface import implementer

from mta.envelope import Address, Envelope
from mta.headers import header_end, remove_fields
from mta.interfaces import (
    IMailStore,
    IMessageBody,
    IPolicyCheck,
    IQueueControl,
    IQueueStore,
    ISpool,
    ISpoolFile,
    IUserDirectory,
)


@attrs.define
class CommittedMessage:
    queue_id: str
    envelope: Envelope
    trace_headers: bytes
    body: bytes

    @property
    def data(self) -> bytes:
        return self.trace_headers + self.body


@implementer(ISpoolFile)
class FakeSpoolFile:
    def __init__(self, spool: FakeSpool, queue_id: str):
        self._spool = spool
        self.queue_id = queue_id
        self._chunks: list[bytes] = []
        self.size = 0
        self.aborted = False
        self.largest_write = 0

    def write(self, data: bytes) -> None:
        assert not self.aborted, "write after abort"
        self._chunks.append(data)
        self.size += len(data)
        self.largest_write = max(self.largest_write, len(data))

    def body(self) -> MemoryBody:
        """The bytes written so far (for end-of-message checks)."""
        assert not self.aborted, "body after abort"
        return MemoryBody(b"".join(self._chunks))

    def remove_headers(self, matches) -> defer.Deferred:
        assert not self.aborted, "remove_headers after abort"
        data = b"".join(self._chunks)
        end = header_end(data)
        head = data if end is None else data[:end]
        new_head, removed = remove_fields(head, matches)
        self._chunks = [new_head, data[len(head) :]]
        self.size = len(new_head) + len(data) - len(head)
        return defer.succeed(removed)

    def commit(self, envelope, trace_headers: bytes):
        message = CommittedMessage(self.queue_id, envelope, trace_headers, b"".join(self._chunks))
        return self._spool._commit(message)

    def abort(self) -> None:
        self.aborted = True
        self._spool.aborted.append(self.queue_id)


@implementer(ISpool)
class FakeSpool:
    """An in-memory spool.

    With `hold=True`, commits stay pending until `release()` (to test that the session
    waits for durability); `fail_with` makes every commit fail with that exception.
    """

    def __init__(self, hold: bool = False, fail_with: Exception | None = None):
        self.hold = hold
        self.fail_with = fail_with
        self.committed: list[CommittedMessage] = []
        self.aborted: list[str] = []
        self.opened: list[FakeSpoolFile] = []
        self._pending: list[tuple[defer.Deferred, CommittedMessage]] = []
        self._counter = 0
        self.backlog_value = 0

    def new_queue_id(self) -> str:
        self._counter += 1
        return f"Q{self._counter:06d}"

    def open(self, queue_id: str) -> FakeSpoolFile:
        f = FakeSpoolFile(self, queue_id)
        self.opened.append(f)
        return f

    def backlog(self) -> int:
        return self.backlog_value

    def _commit(self, message: CommittedMessage) -> defer.Deferred:
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        d = defer.Deferred()
        if self.hold:
            self._pending.append((d, message))
        else:
            self.committed.append(message)
            d.callback(message.queue_id)
        return d

    def release(self) -> None:
        pending, self._pending = self._pending, []
        for d, message in pending:
            self.committed.append(message)
            d.callback(message.queue_id)


@implementer(IUserDirectory)
class FakeDirectory:
    """Maps addresses (as `local@domain` strings) to mailboxes.

    `deferred=True` answers through unfired Deferreds resolved by `flush()`, to test
    pipelining while a lookup is slow.
    """

    def __init__(
        self,
        entries: dict[str, tuple[str, ...]] | None = None,
        postmaster: str = "postmaster@localhost",
        deferred: bool = False,
    ):
        self.entries = {k.lower(): v for k, v in (entries or {}).items()}
        self.postmaster = postmaster
        self.deferred = deferred
        self.pending: list[tuple[defer.Deferred, tuple]] = []
        self.lookups: list[str] = []
        self.quotas: dict[str, tuple[int, int]] = {}

    def _lookup(self, address: Address) -> tuple[Address, ...]:
        key = str(address).lower()
        self.lookups.append(key)
        if address.local.lower() == "postmaster":
            key = self.postmaster
        targets = self.entries.get(key, (key,) if key == self.postmaster else ())
        out = []
        for t in targets:
            local, _, domain = t.rpartition("@")
            out.append(Address(local, domain))
        return tuple(out)

    def resolve(self, address: Address):
        result = self._lookup(address)
        if not self.deferred:
            return result
        d = defer.Deferred()
        self.pending.append((d, result))
        return d

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result)

    def quota_usage(self, mailboxes):
        """From `self.quotas`: `local@domain` -> (quota, used) bytes."""
        quotas = self.quotas
        found = {m: quotas[str(m).lower()] for m in mailboxes if str(m).lower() in quotas}
        return defer.succeed(found) if self.deferred else found


class FakeAuthenticator:
    """`authenticate()` against a dict of passwords; `hold=True` keeps answers
    pending until `release()` (to test that pipelined commands wait)."""

    def __init__(self, users: dict[str, bytes], hold: bool = False):
        self.users = users
        self.hold = hold
        self.pending: list = []
        self.attempts: list[tuple[str, str]] = []

    def authenticate(self, username, password, client_ip, listener_name, *, mechanism=None):
        from mta.smtp.auth import AUTH_INVALID, AUTH_SUCCESSFUL, AuthResult

        self.attempts.append((username, mechanism))
        if self.users.get(username) == password:
            result = AuthResult(True, username, AUTH_SUCCESSFUL)
        else:
            result = AuthResult(False, None, AUTH_INVALID)
        if not self.hold:
            return defer.succeed(result)
        d = defer.Deferred()
        self.pending.append((d, result))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result)


class FakeSenderPolicy:
    """Users may send as the addresses listed for them (and the null sender)."""

    def __init__(self, owned: dict[str, set[str]]):
        self.owned = owned

    def check(self, username, sender):
        from mta.policy.sender import SENDER_NOT_OWNED

        if sender.is_null or str(sender).lower() in self.owned.get(username, set()):
            return defer.succeed(None)
        return defer.succeed(SENDER_NOT_OWNED)


# -- the queue, delivery and storage seams -------------------------------------------


@implementer(IMessageBody)
class MemoryBody:
    """An `IMessageBody` over bytes held in memory (a queued message, in tests)."""

    def __init__(self, data: bytes, *, in_memory: bool = False):
        self.data = bytes(data)
        # What a spool's body says when nothing of it was spilled to disk (checks may
        # then read it on the reactor); False: read it as if from a file.
        self.in_memory = in_memory

    @property
    def size(self) -> int:
        return len(self.data)

    def header_block(self, limit: int = 65536) -> bytes:
        head = self.data[:limit]
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2]
        cut = head.rfind(b"\r\n")
        return head[: cut + 2] if cut >= 0 else b""

    def chunks(self, chunk_size: int = 262144):
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]

    def copy_into(self, fd: int, prefix: bytes = b"") -> int:
        import os

        data = prefix + self.data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        return len(data)


@implementer(IMailStore)
class MemoryMailStore:
    """An `IMailStore` in memory: mailboxes are lists of (tag, bytes).

    `fail_with` makes every delivery fail with that exception (a full disk, say);
    `stored` records each delivery as (mailbox, message_tag, data)."""

    name = "memory"

    def __init__(self, fail_with: Exception | None = None):
        self.fail_with = fail_with
        self.boxes: dict[Address, list[tuple[str, bytes, float]]] = {}
        self.stored: list[tuple[Address, str, bytes]] = []
        self.batches = 0

    def deliver_batch(self, items) -> list:
        import time

        self.batches += 1
        out: list = []
        for item in items:
            if self.fail_with is not None:
                out.append(self.fail_with)
                continue
            box = self.boxes.setdefault(item.mailbox, [])
            if item.check_existing and any(tag == item.message_tag for tag, _, _ in box):
                out.append(f"memory:{item.mailbox}/{item.message_tag}")
                continue
            data = item.prefix + b"".join(item.body.chunks())
            box.append((item.message_tag, data, time.time()))
            self.stored.append((item.mailbox, item.message_tag, data))
            out.append(f"memory:{item.mailbox}/{item.message_tag}")
        return out

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return any(tag == message_tag for tag, _, _ in self.boxes.get(mailbox, ()))

    def create_mailbox(self, mailbox) -> str | None:
        self.boxes.setdefault(mailbox, [])
        return None

    def remove_mailbox(self, mailbox) -> bool:
        return self.boxes.pop(mailbox, None) is not None

    def probe(self) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        return "in memory"

    def list_messages(self, mailbox) -> list:
        from mta.storage import StoredMessage

        return [
            StoredMessage(tag, len(data), when) for tag, data, when in self.boxes.get(mailbox, ())
        ]

    def read_message(self, mailbox, message_id: str) -> bytes:
        for tag, data, _ in self.boxes.get(mailbox, ()):
            if tag == message_id:
                return data
        raise KeyError(message_id)

    def delete_message(self, mailbox, message_id: str) -> None:
        box = self.boxes.get(mailbox, [])
        for i, (tag, _, _) in enumerate(box):
            if tag == message_id:
                del box[i]
                return
        raise KeyError(message_id)


@implementer(IQueueStore)
class MemoryQueueStore(FakeSpool):
    """An `IQueueStore` that keeps everything in memory (nothing survives a restart):
    the queue runner runs on it unchanged, which is what keeps the runner honest
    about using nothing but the interface.  `clock` provides ``seconds``/``callLater``.
    Finished entries are listed in `finished`, dead letters in `dead`."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.on_ready = None
        self.fresh: list = []
        self.waiting: list = []  # (due, entry)
        self.leased: set[str] = set()
        self.finished: list = []
        self.dead: list = []
        self._timer = None

    def _commit(self, message: CommittedMessage) -> defer.Deferred:
        from mta.queue.entry import QueueEntry

        d = super()._commit(message)
        if self.fail_with is None:
            entry = QueueEntry(
                message.queue_id,
                message.envelope,
                "",
                len(message.body),
                message.trace_headers,
                created=self.clock.seconds(),
                body=MemoryBody(message.trace_headers + message.body),
            )
            self.fresh.append(entry)
            self.backlog_value += 1
            if self.on_ready is not None:
                self.on_ready()
        return d

    def recover(self):
        return defer.succeed(0)

    def claim(self, limit: int):
        now = self.clock.seconds()
        due = [e for t, e in self.waiting if t <= now]
        self.waiting = [(t, e) for t, e in self.waiting if t > now]
        ready = self.fresh + due
        out, rest = ready[:limit], ready[limit:]
        self.fresh = rest
        self.leased.update(e.qid for e in out)
        return defer.succeed(out)

    def defer(self, entry, next_attempt: float):
        self.leased.discard(entry.qid)
        self.waiting.append((next_attempt, entry))
        if self._timer is None or not self._timer.active():
            self._timer = self.clock.callLater(
                max(0.0, next_attempt - self.clock.seconds()), self._wake
            )
        return defer.succeed(None)

    def _wake(self) -> None:
        self._timer = None
        if self.on_ready is not None:
            self.on_ready()
        if self.waiting and (self._timer is None or not self._timer.active()):
            due = min(t for t, _ in self.waiting)
            self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._wake)

    def finish(self, entry):
        self.leased.discard(entry.qid)
        self.finished.append(entry)
        self.backlog_value -= 1
        return defer.succeed(None)

    def bury(self, entry, reason: str):
        self.leased.discard(entry.qid)
        self.dead.append((entry, reason))
        self.backlog_value -= 1
        return defer.succeed(None)

    def depth(self) -> dict:
        return {
            "incoming": len(self.fresh),
            "active": len(self.leased),
            "ready": 0,
            "deferred": len(self.waiting),
        }

    def wait_idle(self):
        return defer.succeed(None)

    def stop(self) -> None:
        self.on_ready = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def probe(self) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        return "in memory"


@implementer(IQueueControl)
class FakeQueueControl:
    """An `IQueueControl` that answers from `entries` (qid -> EntrySummary-like) and
    records each action in `actions`."""

    def __init__(self, entries: dict | None = None):
        self.entries = dict(entries or {})
        self.actions: list[tuple[str, str | None]] = []

    def list(self, dead=None) -> list:
        return list(self.entries.values())

    def show(self, qid: str) -> str:
        from mta.queue.control import ControlError

        if qid not in self.entries:
            raise ControlError(f"{qid}: no such message in the queue")
        return f"Queue ID:   {qid}\n"

    def act(self, action: str, qid=None) -> str:
        self.actions.append((action, qid))
        return f"{qid or 'queue'} {action}"


# The name the policy tests know it by.
FakeMessageBody = MemoryBody


@implementer(IPolicyCheck)
class FakePolicyCheck:
    """A policy check answering `verdicts[phase]` (default: `Verdict.ACCEPT`).

    Every call is recorded in `calls` as (phase, context); at DATA the body the check
    was shown is read into `bodies`.  With `hold=True` each answer is a Deferred kept
    in `pending` until `release()`; `error` makes every call raise it.
    """

    def __init__(
        self,
        name: str = "fake",
        phases=None,
        verdicts: dict | None = None,
        *,
        hold: bool = False,
        error: Exception | None = None,
    ):
        from mta.policy.verdict import Phase

        self.name = name
        self.verdicts = dict(verdicts or {})
        self.phases = tuple(phases if phases is not None else (self.verdicts or tuple(Phase)))
        self.hold = hold
        self.error = error
        self.calls: list = []
        self.bodies: list[bytes] = []
        self.pending: list[tuple[defer.Deferred, object]] = []

    def check(self, phase, context):
        from mta.policy.verdict import Verdict

        self.calls.append((phase, context))
        if context.body is not None:
            self.bodies.append(b"".join(context.body.chunks()))
        if self.error is not None:
            raise self.error
        verdict = self.verdicts.get(phase, Verdict.ACCEPT)
        if not self.hold:
            return verdict
        d = defer.Deferred()
        self.pending.append((d, verdict))
        return d

    @property
    def phases_called(self) -> list:
        return [phase for phase, _ in self.calls]

    def release(self, verdict=None) -> None:
        """Fire every pending answer (with `verdict` instead, when given)."""
        pending, self.pending = self.pending, []
        for d, held in pending:
            d.callback(held if verdict is None else verdict)
