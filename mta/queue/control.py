"""Queue control: hold, release, delete, retry, flush and requeue, safely while the
server runs (``mta-admin queue ...``).

Each process owns one spool directory (``queue/`` or ``queue/w<k>/``, see
`mta.process.workers`), and only its owner may move that spool's files: the queue runner
could be delivering the very entry an operator wants to hold.  So the owner holds an
exclusive ``flock`` on ``<spool>/control/lock`` while it runs, and listens on a
command directory, ``<spool>/control/``:

- ``mta-admin`` finds which spool holds the entry, then writes a JSON command into
  ``control/`` (``tmp.*`` then an atomic rename to ``<name>.cmd``);
- the owner's `QueueControl` polls the directory every second (a listdir on its
  thread pool), claims each command by renaming it to ``.work``, executes it on the
  reactor between deliveries (an entry being delivered is first *withdrawn* from the
  runner, which waits for its attempt to end), and answers in ``<name>.result``;
- the CLI waits for the answer (bounded); a command nobody claimed in time is taken
  back (unlinked), so it never runs later by surprise.

When no process holds the lock the server is not running, and the CLI does the same
file operations itself, holding the lock meanwhile.  Held entries live in
``<spool>/hold/`` (recovery only scans ``active/``, so they stay put across restarts);
``release`` moves them back.  ``requeue`` moves a dead letter back to ``active/`` with
its failed recipients pending again and its age reset (else ``max_age`` would expire
it at once).  The file operations are the blocking functions below, shared by both
paths.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import time

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mta.crypto.keys import DecryptionError
from mta.interfaces import IQueueControl
from mta.observe.logging import Logger
from mta.queue import entry as fmt
from mta.queue import files
from mta.queue.filestore import NotQueued
from mta.queue.layout import ACTIVE, CONTROL, HOLD, PLACES, STATUS_SUFFIX, spool_dirs

log = Logger()

ACTIONS = ("flush", "retry", "hold", "release", "delete", "requeue")
_counter = itertools.count()


class ControlError(Exception):
    """A queue command that cannot be carried out; the message says why."""


spool_roots = spool_dirs


def locate(queue_root: str, qid: str) -> tuple[str, str]:
    """(spool root, place) of `qid`: place is active, hold or dead."""
    if not fmt.is_queue_id(qid):
        raise ControlError(f"{qid!r} is not a queue id")
    for root in spool_roots(queue_root):
        for place in PLACES:
            if os.path.exists(os.path.join(root, place, qid)):
                return root, place
    raise ControlError(f"{qid}: no such message in the queue")


# -- the owner's lock ------------------------------------------------------------


class OwnerLock:
    """``flock`` on ``<root>/control/lock``: held by the running owner of a spool."""

    def __init__(self, root: str):
        self.path = os.path.join(root, CONTROL, "lock")
        self._fd: int | None = None

    def acquire(self, blocking: bool = False) -> bool:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock


# -- without a running owner -------------------------------------------------------


def run_offline(root: str, action: str, qid: str | None, now: float) -> str:
    """Carry out a command on a spool no process owns (the caller holds its lock)."""
    if action == "flush":
        return f"{files.make_due(root)} deferred message(s) will be tried when the server starts"
    assert qid is not None
    if action == "retry":
        if not os.path.exists(os.path.join(root, "active", qid)):
            raise ControlError(f"{qid} is not in the active queue")
        files.make_due(root, qid)
        return f"{qid} will be tried when the server starts"
    if action == "hold":
        if not files.move_entry(root, qid, ACTIVE, HOLD):
            raise ControlError(f"{qid} is not in the active queue")
        return f"{qid} held"
    if action == "release":
        if not files.move_entry(root, qid, HOLD, ACTIVE):
            raise ControlError(f"{qid} is not on hold")
        return f"{qid} released"
    if action == "delete":
        if files.delete_entry(root, qid) is None:
            raise ControlError(f"{qid}: no such message in the queue")
        return f"{qid} deleted"
    if action == "requeue":
        try:
            requeued = files.requeue_entry(root, qid, now)
        except fmt.CorruptEntry as e:
            raise ControlError(f"{qid} cannot be requeued: {e}") from None
        if not requeued:
            raise ControlError(f"{qid} is not a dead letter")
        return f"{qid} requeued"
    raise ControlError(f"unknown queue command {action!r}")


# -- the client side (mta-admin) ---------------------------------------------------


def describe(queue_root: str, qid: str, keyring=None) -> str:
    """``queue show``: envelope, per-recipient states and the message headers (of a
    sealed entry: decrypted with `keyring`)."""
    root, place = locate(queue_root, qid)
    path = os.path.join(root, place, qid)
    try:
        entry = fmt.read_entry(path, keyring=keyring)
    except (fmt.CorruptEntry, DecryptionError) as e:
        raise ControlError(str(e)) from None
    env = entry.envelope
    status = fmt.read_status(path + STATUS_SUFFIX) or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created))
    lines = [
        f"Queue ID:   {qid}",
        f"Place:      {place} ({root})",
        f"Arrived:    {when}",
        f"Size:       {entry.size}",
        f"Sender:     {env.sender.path}",
        f"Client:     {env.client_name or '-'} [{env.client_address or '-'}] helo={env.helo or '-'}",
        f"Listener:   {env.listener or '-'}  TLS: {env.tls or 'no'}  "
        f"AUTH: {env.authenticated_as or '-'}",
        f"Attempts:   {entry.attempts}",
    ]
    if entry.next_attempt and place == "active":
        lines.append(
            "Next try:   " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.next_attempt))
        )
    if status.get("reason"):
        lines.append(f"Reason:     {status['reason']}")
    lines.append("Recipients:")
    originals = env.original_recipients
    for i, (rcpt, state) in enumerate(zip(env.recipients, entry.states)):
        orig = f" (for {originals[i]})" if originals and originals[i] != rcpt else ""
        detail = f": {entry.details[i]}" if entry.details[i] else ""
        lines.append(f"  {rcpt.path}{orig} [{state.value}]{detail}")
    lines.append("Headers:")
    try:
        headers = entry.body.header_block().decode("utf-8", "replace")
    except DecryptionError as e:
        raise ControlError(f"{qid}: {e}") from None
    lines += ["  " + line for line in headers.replace("\r\n", "\n").rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def held_summaries(queue_root: str):
    """`EntrySummary`s (state "hold") of held entries, for ``queue list``."""
    from mta.queue.inspect import EntrySummary, RecipientSummary

    out = []
    for root in spool_roots(queue_root):
        directory = os.path.join(root, HOLD)
        try:
            names = sorted(n for n in os.listdir(directory) if fmt.is_queue_id(n))
        except FileNotFoundError:
            continue
        for name in names:
            try:
                entry = fmt.read_entry(os.path.join(directory, name))
            except (OSError, fmt.CorruptEntry):
                continue
            out.append(
                EntrySummary(
                    qid=name,
                    state="hold",
                    created=entry.created,
                    size=entry.size,
                    sender=str(entry.envelope.sender) or "<>",
                    recipients=tuple(
                        RecipientSummary(str(r), s.value, d)
                        for r, s, d in zip(entry.envelope.recipients, entry.states, entry.details)
                    ),
                    attempts=entry.attempts,
                    last_error=entry.last_error,
                )
            )
    return out


def send_command(
    root: str, action: str, qid: str | None = None, timeout: float = 30.0, poll: float = 0.05
) -> str:
    """Hand a command to the running owner of `root` and wait for its answer."""
    directory = os.path.join(root, CONTROL)
    name = f"{time.time_ns():x}-{os.getpid()}-{next(_counter)}"
    tmp = os.path.join(directory, f"tmp.{name}")
    cmd = os.path.join(directory, f"{name}.cmd")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "action": action, "qid": qid}, f)
    os.rename(tmp, cmd)
    result = os.path.join(directory, f"{name}.result")
    deadline = time.monotonic() + timeout
    claimed = False
    while True:
        try:
            with open(result) as f:
                answer = json.load(f)
        except (FileNotFoundError, ValueError):
            answer = None
        if answer is not None:
            os.unlink(result)
            if not answer.get("ok"):
                raise ControlError(answer.get("message", "failed"))
            return answer.get("message", "done")
        if time.monotonic() > deadline:
            if not claimed:
                try:
                    os.unlink(cmd)
                except FileNotFoundError:
                    claimed = True  # being executed: give it a little longer
                    deadline = time.monotonic() + timeout
                    continue
                raise ControlError(
                    f"the server did not take the command within {timeout:.0f}s (not sent)"
                )
            raise ControlError("the server took the command but did not answer; see its log")
        time.sleep(poll)


# -- the operator's view (IQueueControl) ----------------------------------------------


@implementer(IQueueControl)
class FileQueueControl:
    """`IQueueControl` over the file spools under `queue_root`, for `mta-admin` and
    the manhole.  Reads go straight to the committed files (always safe); actions
    go through each spool's running owner when there is one, and are carried out
    directly (under the owner's lock) when the server is not running."""

    def __init__(self, queue_root: str, *, timeout: float = 30.0, keyring=None):
        self.queue_root = queue_root
        self.timeout = timeout
        self.keyring = keyring  # ``[queue] encrypt``: to show sealed messages' headers

    def list(self, dead: bool | None = None) -> list:
        from mta.queue.inspect import list_entries

        entries = list_entries(self.queue_root, dead=dead)
        if dead is not True:
            entries += held_summaries(self.queue_root)
        return sorted(entries, key=lambda s: (s.created, s.qid))

    def show(self, qid: str) -> str:
        return describe(self.queue_root, qid, self.keyring)

    def act(self, action: str, qid: str | None = None) -> str:
        if action not in ACTIONS:
            raise ControlError(f"unknown queue command {action!r}")
        if qid is None and action != "flush":
            raise ControlError(f"queue {action} needs a queue id")
        roots = spool_roots(self.queue_root) if qid is None else [locate(self.queue_root, qid)[0]]
        messages = []
        for root in roots:
            if not os.path.isdir(root):
                continue
            lock = OwnerLock(root)
            if lock.acquire():
                try:
                    messages.append(run_offline(root, action, qid, time.time()))
                finally:
                    lock.release()
            else:
                messages.append(send_command(root, action, qid, timeout=self.timeout))
        return "\n".join(messages)


# -- the server side ---------------------------------------------------------------


class QueueControl(Service):
    """Executes queue commands for one spool in the running server.

    Start it before the runner (it takes the owner lock first) and give it the
    spool's thread pool; `clock` drives the polling.
    """

    name = "queue-control"

    def __init__(self, store, reactor, threadpool, *, poll_interval: float = 1.0):
        self.store = store
        self.reactor = reactor
        self.threadpool = threadpool
        self.poll_interval = poll_interval
        self.root = store.queue_dir
        self.directory = os.path.join(self.root, CONTROL)
        self.lock = OwnerLock(self.root)
        self._loop: task.LoopingCall | None = None
        self._running: Deferred | None = None

    def startService(self) -> None:
        # Blocking, once at startup: a CLI holds this lock for milliseconds at most.
        self.lock.acquire(blocking=True)
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.reactor
        self._running = self._loop.start(self.poll_interval, now=False)
        self._running.addErrback(
            lambda f: log.failure("queue control stopped", failure=f, event="control_failed")
        )

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = self._running
        self._loop = self._running = None
        self.lock.release()
        return d

    def poll(self) -> Deferred:
        d = deferToThreadPool(self.reactor, self.threadpool, self._claim)
        d.addCallback(lambda commands: Deferred.fromCoroutine(self._execute_all(commands)))
        d.addErrback(lambda f: log.failure("queue control poll failed", failure=f))
        return d

    def _claim(self) -> list[tuple[str, dict | None]]:
        try:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".cmd"))
        except FileNotFoundError:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            return []
        claimed = []
        for name in names:
            base = os.path.join(self.directory, name[:-4])
            try:
                os.rename(base + ".cmd", base + ".work")
            except FileNotFoundError:
                continue  # taken back by the CLI
            try:
                with open(base + ".work") as f:
                    command = json.load(f)
            except (OSError, ValueError):
                command = None
            claimed.append((base, command))
        return claimed

    async def _execute_all(self, commands) -> None:
        for base, command in commands:
            try:
                if not isinstance(command, dict):
                    raise ControlError("unreadable command")
                message = await self.execute(command.get("action"), command.get("qid"))
                answer = {"ok": True, "message": message}
            except ControlError as e:
                answer = {"ok": False, "message": str(e)}
            except Exception as e:
                log.failure("queue command failed", event="control_failed")
                answer = {"ok": False, "message": f"internal error: {e!r}"}
            log.info(
                "queue command {action} {qid}: {message}",
                action=(command or {}).get("action"),
                qid=(command or {}).get("qid"),
                message=answer["message"],
                ok=answer["ok"],
                event="queue_control",
            )
            await deferToThreadPool(self.reactor, self.threadpool, _answer, base, answer)

    async def execute(self, action: str, qid: str | None) -> str:
        """Carry out one command on the reactor; its message, or ControlError."""
        store = self.store
        if action == "flush":
            return f"{store.flush()} deferred message(s) scheduled now"
        if action not in ACTIONS or not isinstance(qid, str) or not fmt.is_queue_id(qid):
            raise ControlError(f"bad queue command {action!r} {qid!r}")
        if action == "retry":
            outcome = store.retry(qid)
            if outcome == "scheduled":
                return f"{qid} scheduled now"
            if outcome == "busy":
                return f"{qid} is already being tried"
            raise ControlError(f"{qid} is not waiting in the active queue")
        try:
            if action == "hold":
                await store.hold(qid)
                return f"{qid} held"
            if action == "delete":
                await store.delete(qid)
                return f"{qid} deleted"
            if action == "release":
                await store.release(qid)
                return f"{qid} released"
            await store.requeue(qid)
            return f"{qid} requeued"
        except NotQueued as e:
            raise ControlError(str(e)) from None
        except fmt.CorruptEntry as e:
            raise ControlError(f"{qid} cannot be requeued: {e}") from None

    def _thread(self, f, *args):
        return deferToThreadPool(self.reactor, self.threadpool, f, *args)


def _answer(base: str, answer: dict) -> None:
    tmp = base + ".answer"
    with open(tmp, "w") as f:
        json.dump(answer, f)
    os.rename(tmp, base + ".result")
    try:
        os.unlink(base + ".work")
    except FileNotFoundError:
        pass
