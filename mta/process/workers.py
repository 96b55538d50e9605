"""Worker processes: one per core, sharing the listening sockets.

One CPython process runs on one core, so `workers = N` makes the twistd process the
first of N: it binds the listeners (before any privilege drop), then spawns N-1
children (`python -m mta.process.child`) that inherit those sockets and adopt them;
the kernel gives each new connection to whichever process accepts it first.  Every
process owns its own queue (with the file spool, `queue/` for the first, `queue/w<k>/`
for worker k), so no two processes ever deliver the same entry; mailboxes are Maildirs,
which are built for concurrent writers, and the user database is SQLite in WAL mode.

A child stops when its parent goes away (its stdin reaches EOF), so a `kill -9` of
the parent never leaves orphans holding the ports; the parent restarts a child that
dies, and stops them all, waiting for each, when it stops.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet import defer, protocol

from mta.observe.logging import Logger

log = Logger()

RESPAWN_DELAY = 1.0
STOP_TIMEOUT = 30.0


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
            "mta.process.child",
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
