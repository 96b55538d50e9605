"""Worker processes: one per core, sharing the listening sockets.

One CPython process runs on one core, so `workers = N` makes the twistd process the
first of N: it binds the listeners (before any privilege drop), then spawns N-1
children (`python -m mta.workers`) that inherit those sockets and adopt them; the
kernel gives each new connection to whichever process accepts it first.  Every
process owns its own spool directory (`queue/` for the first, `queue/w<k>/` for
worker k), so no two processes ever deliver the same entry; mailboxes are Maildirs,
which are built for concurrent writers, and the user database is SQLite in WAL mode.

A child stops when its parent goes away (its stdin reaches EOF), so a `kill -9` of
the parent never leaves orphans holding the ports; the parent restarts a child that
dies, and stops them all, waiting for each, when it stops.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys

from twisted.application import service
from twisted.internet import defer, protocol

from mta.observe.logging import Logger
from mta.queue.spool import worker_of

log = Logger()

RESPAWN_DELAY = 1.0
STOP_TIMEOUT = 30.0


def adopt_orphaned_queues(queue_root: str, workers: int) -> int:
    """Move entries of workers that no longer exist into the first worker's queue.

    Runs once at startup, before any spool or child exists, so it races with nothing.
    Returns how many files moved.
    """
    moved = 0
    try:
        names = os.listdir(queue_root)
    except FileNotFoundError:
        return 0
    target = os.path.join(queue_root, "active")
    for name in names:
        index = worker_of(name)
        if index is None or index < workers:
            continue
        os.makedirs(target, mode=0o700, exist_ok=True)
        for sub in ("active", "dead", "hold"):
            src = os.path.join(queue_root, name, sub)
            dst = os.path.join(queue_root, sub)
            if not os.path.isdir(src):
                continue
            os.makedirs(dst, mode=0o700, exist_ok=True)
            for entry in os.listdir(src):
                os.rename(os.path.join(src, entry), os.path.join(dst, entry))
                moved += 1
        shutil.rmtree(os.path.join(queue_root, name), ignore_errors=True)
    if moved:
        log.info("adopted {count} queue files of retired workers", count=moved)
    return moved


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int):
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason):
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """Spawns, restarts and stops the worker processes 1..N-1."""

    name = "workers"

    def __init__(self, config, listeners, reactor, count: int):
        self.config = config
        self.listeners = listeners
        self.reactor = reactor
        self.count = count
        self.children: dict[int, _ChildProtocol] = {}
        self._stopping = False

    def startService(self):
        super().startService()
        self._stopping = False
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self._stopping:
            return
        fds = {}
        argv = [
            sys.executable,
            "-m",
            "mta.workers",
            "--index",
            str(index),
            "--datadir",
            self.config.datadir,
        ]
        if self.config.source != "<defaults>":
            argv += ["--config", self.config.source]
        for n, listener in enumerate(self.listeners):
            child_fd = 3 + n
            fds[child_fd] = listener.fileno()
            argv += ["--fd", f"{listener.listener.name}={child_fd}"]
        child = _ChildProtocol(self, index)
        self.children[index] = child
        self.reactor.spawnProcess(
            child, sys.executable, argv, env=dict(os.environ), childFDs={0: "w", 1: 1, 2: 2, **fds}
        )
        log.info("started worker {index} as pid {pid}", index=index, pid=child.transport.pid)

    def _ended(self, child: _ChildProtocol, reason) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if self._stopping:
            return
        log.error(
            "worker {index} exited unexpectedly ({reason}); restarting it",
            index=child.index,
            reason=reason.getErrorMessage(),
        )
        self.reactor.callLater(RESPAWN_DELAY, self._spawn, child.index)

    def signal_all(self, name: str) -> None:
        for child in list(self.children.values()):
            try:
                child.transport.signalProcess(name)
            except Exception:
                log.failure("signalling worker {index}", index=child.index)

    def stopService(self):
        super().stopService()
        self._stopping = True
        waits = []
        for child in list(self.children.values()):
            waits.append(child.ended)
            try:
                child.transport.signalProcess("TERM")
            except Exception:
                continue
            killer = self.reactor.callLater(STOP_TIMEOUT, _kill, child)
            child.ended.addBoth(lambda r, k=killer: k.active() and k.cancel())
        return defer.DeferredList(waits)


def _kill(child: _ChildProtocol) -> None:
    log.error("worker {index} ignored SIGTERM; killing it", index=child.index)
    try:
        child.transport.signalProcess("KILL")
    except Exception:
        pass


class _ParentWatch(protocol.Protocol):
    """Stops the worker when the parent's end of stdin closes (the parent died)."""

    def __init__(self, reactor):
        self.reactor = reactor

    def connectionLost(self, reason=None):
        if self.reactor.running:
            log.info("parent process went away; worker stopping")
            self.reactor.stop()


def main(argv=None) -> int:
    """Entry point of a worker process (`python -m mta.workers`)."""
    parser = argparse.ArgumentParser(prog="mta.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--datadir")
    parser.add_argument(
        "--fd", action="append", default=[], help="LISTENER=FD of an inherited socket"
    )
    args = parser.parse_args(argv)

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from mta.app import build_service
    from mta.config import load_config
    from mta.observe.logging import make_observer

    config = load_config(args.config, datadir=args.datadir)
    inherited = {}
    for item in args.fd:
        name, _, fd = item.partition("=")
        inherited[name] = int(fd)
    globalLogBeginner.beginLoggingTo(
        [make_observer(config.log.format, config.log.level, sys.stdout)], redirectStandardIO=False
    )
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the service installs its handler
    root = build_service(config, reactor, worker_index=args.index, inherited=inherited)
    stdio.StandardIO(_ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))
    exit_code = []

    def start():
        try:
            root.startService()
        except Exception:
            log.failure("worker {index} failed to start", index=args.index)
            exit_code.append(1)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: root.running and root.stopService())
    reactor.run()
    return exit_code[0] if exit_code else 0


if __name__ == "__main__":
    sys.exit(main())
