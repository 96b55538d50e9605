"""Liveness and readiness, as values a load balancer or an orchestrator can act on.

Liveness (`/healthz`) answers "is this process worth keeping": the reactor runs its
timers (a heartbeat `LoopingCall` has ticked recently).  Readiness (`/readyz`) answers
"should mail be sent here now": the spool directory takes a new file, the user
database answers a query, the mail store takes a new file, and the queue runner is
running.  Each probe that touches the disk or SQLite runs in a thread of the pool it is
given and under a timeout, so a hung disk makes the probe fail instead of hanging the
reactor or the HTTP request.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, task, threads

from mta.observe.logging import Logger

log = Logger()

PROBE_TIMEOUT = 5.0
HEARTBEAT_INTERVAL = 1.0
STALL_AFTER = 10.0


@attrs.frozen
class ProbeResult:
    name: str
    ok: bool
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.ok else "fail"}
        if self.detail:
            out["detail"] = self.detail
        return out


@attrs.frozen
class Report:
    """What /healthz and /readyz answer: 200 with status ok, else 503."""

    ok: bool
    checks: tuple[ProbeResult, ...] = ()

    @property
    def code(self) -> int:
        return 200 if self.ok else 503

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.ok else "fail"}
        if self.checks:
            out["checks"] = {c.name: c.as_json() for c in self.checks}
        return out


# -- blocking probes (run in a thread) ---------------------------------------------


def probe_directory_writable(directory: str, rename_into: str | None = None) -> str:
    """Create, write and remove a file in `directory` (renamed into `rename_into`
    first when given, as the spool does); raise OSError when any step fails."""
    name = f".probe-{os.getpid()}"
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"probe\n")
    finally:
        os.close(fd)
    try:
        if rename_into is not None:
            target = os.path.join(rename_into, name)
            os.rename(path, target)
            path = target
    finally:
        # The spool's startup scan may remove a stray tmp file under our feet.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return "writable"


def probe_database(path: str) -> str:
    """Open the SQLite file read-only and run a query on it."""
    if not os.path.exists(path):
        raise OSError(f"{path} does not exist")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
    try:
        (count,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    finally:
        conn.close()
    if not count:
        raise sqlite3.DatabaseError(f"{path} has no schema")
    return "reachable"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


class Health:
    """Liveness and readiness of one process's service tree.

    `probes` maps a name to a blocking callable run in `threadpool`; `checks` maps a
    name to a cheap callable run on the reactor thread that returns (ok, detail).
    """

    def __init__(
        self,
        reactor,
        threadpool,
        *,
        probes: dict[str, Callable[[], str]] | None = None,
        checks: dict[str, Callable[[], tuple[bool, str]]] | None = None,
        timeout: float = PROBE_TIMEOUT,
        stall_after: float = STALL_AFTER,
    ):
        self.reactor = reactor
        self.threadpool = threadpool
        self.probes = dict(probes or {})
        self.checks = dict(checks or {})
        self.timeout = timeout
        self.stall_after = stall_after
        self.last_beat: float | None = None
        self._heartbeat: task.LoopingCall | None = None

    # -- liveness ---------------------------------------------------------------

    def start(self, interval: float = HEARTBEAT_INTERVAL) -> None:
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(interval, now=True).addErrback(
            lambda f: log.failure("health heartbeat died", f)
        )

    def stop(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

    def _beat(self) -> None:
        self.last_beat = self.reactor.seconds()

    def liveness(self) -> Report:
        """Alive when the reactor ran the heartbeat timer within `stall_after`."""
        if self.last_beat is None:
            return Report(True)  # not started (a test, or no HTTP): serving is proof enough
        lag = self.reactor.seconds() - self.last_beat
        if lag > self.stall_after:
            return Report(False, (ProbeResult("reactor", False, f"timers late by {lag:.1f}s"),))
        return Report(True)

    # -- readiness --------------------------------------------------------------

    async def readiness(self) -> Report:
        results = [self._check(name, check) for name, check in self.checks.items()]
        waits = [self._probe(name, probe) for name, probe in self.probes.items()]
        for d in waits:
            results.append(await d)
        order = {name: i for i, name in enumerate([*self.probes, *self.checks])}
        results.sort(key=lambda r: order.get(r.name, 0))
        return Report(all(r.ok for r in results), tuple(results))

    def _check(self, name: str, check: Callable[[], tuple[bool, str]]) -> ProbeResult:
        try:
            ok, detail = check()
        except Exception as e:
            return ProbeResult(name, False, _describe(e))
        return ProbeResult(name, ok, detail)

    def _probe(self, name: str, probe: Callable[[], str]) -> defer.Deferred:
        d = threads.deferToThreadPool(self.reactor, self.threadpool, probe)
        d.addTimeout(self.timeout, self.reactor)
        d.addCallbacks(
            lambda detail: ProbeResult(name, True, detail),
            lambda f: ProbeResult(
                name,
                False,
                f"no answer within {self.timeout:g}s"
                if f.check(defer.TimeoutError)
                else _describe(f.value),
            ),
        )
        return d


def service_probes(root, *, database: str) -> dict[str, Callable[[], str]]:
    """The blocking readiness probes for the service tree `root`: its queue store
    (`root.spool`) and mail store (`root.store`) each prove they can take a message."""
    return {
        "spool": root.spool.probe,
        "database": lambda: probe_database(database),
        "storage": root.store.probe,
    }


def service_checks(root) -> dict[str, Callable[[], tuple[bool, str]]]:
    """The reactor-thread readiness checks for `root`: the queue runner is running
    and its recovery scan did not fail."""

    def runner_check() -> tuple[bool, str]:
        runner = root.runner
        if runner is None or not runner.running:
            return False, "queue runner not running"
        recovery = getattr(runner, "recovery", None)
        if recovery is not None and not recovery.called:
            return True, "recovering"
        return True, "running"

    return {"queue_runner": runner_check}
