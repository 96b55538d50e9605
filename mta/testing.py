"""Test doubles for the seams in `mta.interfaces`, shipped with the package (like
`treq.testing`) so every test and every downstream user fakes the same way."""

from __future__ import annotations

import os

import attrs
from twisted.internet import defer
from zope.interface import implementer

from mta.envelope import Address, Envelope
from mta.interfaces import IMessageBody, IPolicyCheck, ISpool, ISpoolFile, IUserDirectory


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

    def body(self) -> FakeMessageBody:
        assert not self.aborted, "body after abort"
        return FakeMessageBody(b"".join(self._chunks))

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


@implementer(IMessageBody)
class FakeMessageBody:
    """An in-memory `IMessageBody` over `data` (what `FakeSpoolFile.body()` gives)."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)

    def header_block(self, limit: int = 65536) -> bytes:
        head = self.data[:limit]
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 2]
        if len(head) < len(self.data) or len(head) >= limit:
            cut = head.rfind(b"\r\n")
            return head[: cut + 2] if cut >= 0 else b""
        return head if head.endswith(b"\r\n") or not head else head + b"\r\n"

    def chunks(self, chunk_size: int = 262144):
        for i in range(0, len(self.data), chunk_size):
            yield self.data[i : i + chunk_size]

    def copy_into(self, fd: int) -> int:
        view = memoryview(self.data)
        while view:
            view = view[os.write(fd, view) :]
        return self.size


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
