"""Queue control: hold, release, delete, retry, flush and requeue, safely while the
server runs (``mta-admin queue ...``).

Each process owns one spool directory (``queue/`` or ``queue/w<k>/``, see
`mta.workers`), and only its owner may move that spool's files: the queue runner
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

from mta.envelope import RecipientState
from mta.fileio import fsync_dir
from mta.observe.logging import Logger
from mta.queue import entry as fmt
from mta.queue.entry import FINAL_STATES, STATUS_SUFFIX
from mta.queue.spool import spool_dirs

log = Logger()

CONTROL = "control"
HOLD = "hold"
ACTIONS = ("flush", "retry", "hold", "release", "delete", "requeue")
_PLACES = ("active", HOLD, "dead")
_counter = itertools.count()


class ControlError(Exception):
    """A queue command that cannot be carried out; the message says why."""


# Every spool under the queue root (kept under this name for the CLI).
spool_roots = spool_dirs


def locate(queue_root: str, qid: str) -> tuple[str, str]:
    """(spool root, place) of `qid`: place is active, hold or dead."""
    if not fmt.is_queue_id(qid):
        raise ControlError(f"{qid!r} is not a queue id")
    for root in spool_roots(queue_root):
        for place in _PLACES:
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


# -- file operations (blocking; the server runs them on its pool) -------------------


def _move(root: str, qid: str, src: str, dst: str) -> bool:
    """Move an entry and its status between places; False when it is not in `src`."""
    src_dir, dst_dir = os.path.join(root, src), os.path.join(root, dst)
    os.makedirs(dst_dir, mode=0o700, exist_ok=True)
    try:
        os.rename(os.path.join(src_dir, qid), os.path.join(dst_dir, qid))
    except FileNotFoundError:
        return False
    try:
        os.rename(
            os.path.join(src_dir, qid + STATUS_SUFFIX), os.path.join(dst_dir, qid + STATUS_SUFFIX)
        )
    except FileNotFoundError:
        pass
    fsync_dir(dst_dir)
    fsync_dir(src_dir)
    return True


def hold_files(root: str, qid: str) -> bool:
    return _move(root, qid, "active", HOLD)


def release_files(root: str, qid: str) -> bool:
    return _move(root, qid, HOLD, "active")


def delete_files(root: str, qid: str) -> str | None:
    """Delete `qid` wherever it is; the place it was in, or None."""
    for place in _PLACES:
        path = os.path.join(root, place, qid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        try:
            os.unlink(path + STATUS_SUFFIX)
        except FileNotFoundError:
            pass
        fsync_dir(os.path.join(root, place))
        return place
    return None


def requeue_files(root: str, qid: str, now: float) -> bool:
    """Dead letter -> active: failed recipients pending again, age counted from `now`."""
    path = os.path.join(root, "dead", qid)
    try:
        entry = fmt.read_entry(path)
    except FileNotFoundError:
        return False
    except fmt.CorruptEntry as e:
        raise ControlError(f"{qid} cannot be requeued: {e}") from None
    # Rewrite the trailer in place with the new creation time (the body stays).
    meta = fmt.encode_metadata(qid, entry.envelope, entry.trace_headers, entry.body_length, now)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, entry.body_length)
        os.pwrite(fd, fmt.encode_trailer(meta, entry.body_length), entry.body_length)
        os.fsync(fd)
    finally:
        os.close(fd)
    for i, state in enumerate(entry.states):
        if state not in FINAL_STATES or state is RecipientState.FAILED:
            entry.states[i] = RecipientState.PENDING
            entry.details[i] = ""
    entry.attempts, entry.next_attempt, entry.last_error = 0, 0.0, ""
    status = path + STATUS_SUFFIX
    with open(status + ".tmp", "wb") as f:
        f.write(fmt.encode_status(entry))
        f.flush()
        os.fsync(f.fileno())
    os.rename(status + ".tmp", status)
    return _move(root, qid, "dead", "active")


def make_due_files(root: str, qid: str | None = None) -> int:
    """Offline flush/retry: record next_attempt 0 so the next start tries them at once."""
    count = 0
    active = os.path.join(root, "active")
    names = [qid] if qid else sorted(n for n in os.listdir(active) if fmt.is_queue_id(n))
    for name in names:
        status_path = os.path.join(active, name + STATUS_SUFFIX)
        status = fmt.read_status(status_path)
        if status is None or not status.get("next_attempt"):
            continue
        status["next_attempt"] = 0.0
        with open(status_path, "ab") as f:
            f.write(json.dumps(status, separators=(",", ":")).encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        count += 1
    return count


def run_offline(root: str, action: str, qid: str | None, now: float) -> str:
    """Carry out a command on a spool no process owns (the caller holds its lock)."""
    if action == "flush":
        return f"{make_due_files(root)} deferred message(s) will be tried when the server starts"
    assert qid is not None
    if action == "retry":
        if not os.path.exists(os.path.join(root, "active", qid)):
            raise ControlError(f"{qid} is not in the active queue")
        make_due_files(root, qid)
        return f"{qid} will be tried when the server starts"
    if action == "hold":
        if not hold_files(root, qid):
            raise ControlError(f"{qid} is not in the active queue")
        return f"{qid} held"
    if action == "release":
        if not release_files(root, qid):
            raise ControlError(f"{qid} is not on hold")
        return f"{qid} released"
    if action == "delete":
        if delete_files(root, qid) is None:
            raise ControlError(f"{qid}: no such message in the queue")
        return f"{qid} deleted"
    if action == "requeue":
        if not requeue_files(root, qid, now):
            raise ControlError(f"{qid} is not a dead letter")
        return f"{qid} requeued"
    raise ControlError(f"unknown queue command {action!r}")


# -- the client side (mta-admin) ---------------------------------------------------


def describe(queue_root: str, qid: str) -> str:
    """``queue show``: envelope, per-recipient states and the message headers."""
    from mta.queue.bounce import read_original_headers

    root, place = locate(queue_root, qid)
    path = os.path.join(root, place, qid)
    try:
        entry = fmt.read_entry(path)
    except fmt.CorruptEntry as e:
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
    headers = read_original_headers(entry).decode("utf-8", "replace")
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


# -- the server side ---------------------------------------------------------------


class QueueControl(Service):
    """Executes queue commands for one spool in the running server.

    Start it before the runner (it takes the owner lock first) and give it the
    spool's thread pool; `clock` drives the polling.
    """

    name = "queue-control"

    def __init__(self, spool, runner, reactor, threadpool, *, poll_interval: float = 1.0):
        self.spool = spool
        self.runner = runner
        self.reactor = reactor
        self.threadpool = threadpool
        self.poll_interval = poll_interval
        self.root = spool.queue_dir
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
        if action == "flush":
            return f"{self.runner.flush()} deferred message(s) scheduled now"
        if action not in ACTIONS or not isinstance(qid, str) or not fmt.is_queue_id(qid):
            raise ControlError(f"bad queue command {action!r} {qid!r}")
        if action == "retry":
            outcome = self.runner.retry(qid)
            if outcome == "scheduled":
                return f"{qid} scheduled now"
            if outcome == "busy":
                return f"{qid} is already being tried"
            raise ControlError(f"{qid} is not waiting in the active queue")
        if action in ("hold", "delete"):
            await self.runner.withdraw(qid)
            try:
                if action == "hold":
                    moved = await self._thread(hold_files, self.root, qid)
                    place = "active" if moved else None
                else:
                    place = await self._thread(delete_files, self.root, qid)
            except Exception:
                self.runner.readmit(qid)  # still in active/: keep delivering it
                raise
            self.runner.forget(qid)
            if place == "active":
                self.spool.adjust_backlog(-1)
            if action == "hold":
                if place is None:
                    raise ControlError(f"{qid} is not in the active queue")
                return f"{qid} held"
            if place is None:
                raise ControlError(f"{qid}: no such message in the queue")
            return f"{qid} deleted"
        if action == "release":
            if not await self._thread(release_files, self.root, qid):
                raise ControlError(f"{qid} is not on hold")
        else:  # requeue
            if not await self._thread(requeue_files, self.root, qid, self.reactor.seconds()):
                raise ControlError(f"{qid} is not a dead letter")
        self.spool.adjust_backlog(1)
        self.runner.readmit(qid)
        return f"{qid} {action}d" if action == "release" else f"{qid} requeued"

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
