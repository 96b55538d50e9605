"""`PGQueueStore`: the `IQueueStore` kept in PostgreSQL, shared by every node.

Any node accepts, any node delivers.  A commit (`mta.queue.pgspool`) inserts the
entry, its recipients and its body in one transaction before the 250; the node
that accepted it usually leases it to itself in the same statement and tries it at
once with the body still in memory (up to `window` such entries), so the common
case costs no claim.  Everything else is claimed with ``SELECT ... FOR UPDATE SKIP
LOCKED`` and a lease of `lease` seconds on the injected clock (`mta.queue.pgsql`):
two nodes never hold one entry, and the leases of a node that died expire and
are taken by the others.  A node renews its leases every `lease / 3` seconds
while it delivers, with its heartbeat row (``mta-admin cluster status``) and the
cluster's queue depth for ``/metrics``.

Recipients' final states are committed at once: `RecordingAgent` wraps the
delivery agent and writes each destination's delivered/failed results right
after its delivery returns, before the attempt goes on, so the next node to hold
the entry never delivers those again.  The window that remains: a peer answered
250 and this node died (or lost PostgreSQL) before that commit; the next node,
seeing an entry whose lease another held (``recovered``), delivers it again,
except to local mailboxes, which recognise the copy (`job.may_be_delivered`).
Postfix has the same window between the peer's 250 and its queue file update.

New work is announced with LISTEN/NOTIFY (`mta.queue.pglisten`); a slow poll
(`poll_interval`) finds retry times that came on other nodes and expired leases.
When PostgreSQL is down, commits fail (the session answers 451), claims find
nothing and are retried on the poll, and service resumes by itself.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

import mta
from mta.envelope import RecipientState
from mta.interfaces import IQueueStore
from mta.observe.logging import Logger
from mta.process.batch import BatchWorker
from mta.queue import pgsql
from mta.queue.entry import QueueEntry
from mta.queue.ids import new_queue_id
from mta.queue.pgbody import PGBody, Places
from mta.queue.pgconn import Connections, apply_queue_schema, node_id
from mta.queue.pglisten import NotifyListener
from mta.queue.pgspool import MEMORY_LIMIT, CommitJob, PGSpoolFile, clean_spill, commit_batch
from mta.queue.s3body import ORPHAN_AGE

log = Logger()


@implementer(IQueueStore)
class PGQueueStore(Service):
    """See the module docstring.  Add it to the service tree before the runner (it
    stops after it: leases given back, heartbeat row removed, connections closed)."""

    name = "pg-queue"

    def __init__(
        self,
        connections: Connections,
        reactor,
        threadpool,
        *,
        spill_dir: str,
        hostname: str = "",
        lease: float = 60.0,
        poll_interval: float = 10.0,
        window: int = 100,
        lanes: int = 1,
        memory_limit: int = MEMORY_LIMIT,
        listen: bool = True,
        node: str | None = None,
        places: Places | None = None,
    ):
        self.connections = connections
        self.reactor = reactor
        self._pool = threadpool
        self.spill_dir = spill_dir
        self.hostname = hostname
        self.node = node or node_id(hostname)
        self.lease = float(lease)
        self.poll_interval = poll_interval
        self.window = window
        self.memory_limit = memory_limit
        self.bodies = places or Places()  # where bodies go: PostgreSQL or S3, sealed or not
        self.on_ready: Callable[[], None] | None = None
        self._salt = os.urandom(2).hex()
        self._writer = BatchWorker(reactor, threadpool, self._commit_batch, lanes)
        # Results, defers, finishes and dead letters of concurrent attempts share one
        # transaction (one WAL flush) per batch, like the commits.
        self._returns = BatchWorker(reactor, threadpool, self._return_batch, lanes)
        self._fresh: deque[QueueEntry] = deque()
        self._taking = 0  # commits in flight that lease their entry to this node
        self._leased: set[str] = set()
        self._maybe_due = True
        self._due_times: list[float] = []
        self._timer = None
        self._stopped = False
        self._inflight: set[Deferred] = set()
        self._depth: dict[str, int] = {}
        self._backlog_delta = 0
        self._started = reactor.seconds()
        self._maintenance: task.LoopingCall | None = None
        self._sweeping: task.LoopingCall | None = None
        self.listener = NotifyListener(connections, reactor, self._notified) if listen else None

    # -- service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        clean_spill(self.spill_dir)
        self._maintenance = task.LoopingCall(self.maintain)
        self._maintenance.clock = self.reactor
        self._maintenance.start(max(1.0, self.lease / 3.0), now=True).addErrback(
            lambda f: log.failure("queue maintenance stopped", failure=f)
        )
        if self.listener is not None:
            self.listener.start()
        if self.bodies.s3 is not None:
            self._sweeping = task.LoopingCall(self.sweep)
            self._sweeping.clock = self.reactor
            self._sweeping.start(ORPHAN_AGE, now=True)

    def stopService(self):
        super().stopService()
        self.stop()
        for loop in (self._maintenance, self._sweeping):
            if loop is not None and loop.running:
                loop.stop()
        d = self.wait_idle()
        fresh = [e.qid for e in self._fresh]
        self._fresh.clear()

        def leave(_):
            def work(conn):
                pgsql.release(conn, self.node, fresh)
                if fresh:
                    pgsql.notify(conn, self.node)
                pgsql.leave(conn, self.node)

            return self._run(work)

        def close(_):
            if self.listener is not None:
                self.listener.stop(timeout=0.0)
            self.connections.close()

        d.addCallback(leave)
        d.addErrback(lambda f: log.warn("leaving the cluster: {e}", e=f.getErrorMessage()))
        d.addBoth(close)
        return d

    # -- helpers --------------------------------------------------------------------------

    def _run(self, job, *args) -> Deferred:
        """`job(conn, *args)` in a transaction on the thread pool."""
        d = deferToThreadPool(self.reactor, self._pool, self.connections.run, job, *args)
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            return result

        return d.addBoth(done)

    def _ready(self) -> None:
        if self.on_ready is not None and not self._stopped:
            self.on_ready()

    def _poke(self) -> None:
        self._maybe_due = True
        self._ready()

    def _notified(self, payload: str | None) -> None:
        if payload != self.node:
            self._poke()

    # -- ISpool -------------------------------------------------------------------------

    def new_queue_id(self) -> str:
        # Unique across nodes too: time, pid and counter, then this store's salt.
        return new_queue_id() + self._salt

    def open(self, queue_id: str) -> PGSpoolFile:
        return PGSpoolFile(self, queue_id)

    def backlog(self) -> int:
        d = self._depth
        base = d.get("active", 0) + d.get("ready", 0) + d.get("deferred", 0)
        return max(0, base + self._backlog_delta)

    def _commit(self, job: CommitJob) -> Deferred:
        if not self._stopped and len(self._fresh) + self._taking < self.window:
            job.lease_until = self.reactor.seconds() + self.lease
            self._taking += 1
        d = self._writer.submit(job)
        d.addCallbacks(self._committed, self._commit_failed, (job,), None, (job,))
        return d

    def _commit_batch(self, jobs: list[CommitJob]) -> list:
        """Thread: bodies sealed and put in S3 first (when configured), then one
        transaction for the whole batch (`mta.queue.s3body` says why)."""
        try:
            errors = self.bodies.stage(jobs)
            staged = [job for job in jobs if id(job) not in errors]
            try:
                if staged:
                    self.connections.run(commit_batch, self.bodies, staged, self.node)
            except Exception as e:
                self.bodies.unstage(staged)
                errors.update((id(job), e) for job in staged)
        finally:
            for job in jobs:
                job.discard_spill()
        return [(False, errors[id(j)]) if id(j) in errors else (True, None) for j in jobs]

    def _return_batch(self, items: list) -> list:
        """Thread: (statement, args) items in one transaction; all fail together."""

        def work(conn):
            if all(statement is pgsql.finish for statement, _ in items):
                # Removing finished entries need not wait for the WAL flush: their
                # recipients' final states were committed (synchronously) by
                # RecordingAgent, so an entry whose removal a PostgreSQL crash
                # undid comes back with nothing left to deliver.
                conn.execute("SET LOCAL synchronous_commit = off")
            return [statement(conn, *args) for statement, args in items]

        try:
            results = self.connections.run(work)
        except Exception as e:
            return [(False, e)] * len(items)
        self.bodies.forget(  # rows gone: their S3 objects go too
            (args[0].qid, args[0].body.ref)
            for (statement, args), done in zip(items, results)
            if statement is pgsql.finish and done is True
        )
        return [(True, r) for r in results]

    def _commit_failed(self, f, job: CommitJob):
        if job.lease_until is not None:
            self._taking -= 1
        log.error(
            "commit of {qid} failed: {error}",
            qid=job.qid,
            error=f.getErrorMessage(),
            event="commit_failed",
        )
        return f

    def _committed(self, _, job: CommitJob) -> str:
        self._backlog_delta += 1
        log.info(
            "queued {qid} from {sender} to {count} recipient(s), {size} bytes",
            qid=job.qid,
            sender=str(job.envelope.sender) or "<>",
            count=len(job.envelope.recipients),
            size=job.length,
            event="queued",
        )
        if job.lease_until is None:
            self._poke()  # beyond the window: claimable by any node, this one too
            return job.qid
        self._taking -= 1
        memory = job.chunks if job.fd is None and job.path is None else None
        entry = self._entry(
            job.qid,
            job.envelope,
            job.trace_headers,
            job.length,
            job.created,
            memory=memory,
            ref=job.ref,
            seal=None if job.sealer is None else job.sealer.opener(),
        )
        job.chunks = []
        if self._stopped:
            return job.qid  # leased: released when the store stops
        self._fresh.append(entry)
        self._ready()
        if self._fresh and self._fresh[-1] is entry:
            entry.body.forget_memory()  # not claimed at once: it waits, reading PG
        return job.qid

    def _entry(
        self, qid, envelope, trace, length, created, *, memory=None, ref="pg", seal=None
    ) -> QueueEntry:
        body = PGBody(trace, qid, length, self.connections, self.bodies, memory, ref=ref, seal=seal)
        return QueueEntry(
            qid=qid,
            envelope=envelope,
            path="",
            body_length=length,
            trace_headers=trace,
            created=created,
            body=body,
        )

    # -- recovery and claims --------------------------------------------------------------

    def recover(self) -> Deferred:
        """Apply the schema (until the migration runner does), say hello, and count
        the cluster's queue; claims then find what earlier processes left."""
        self._stopped = False
        self._poke_later(0)

        def hello(conn):
            apply_queue_schema(conn)  # idempotent; see its docstring
            self._heartbeat(conn, self.reactor.seconds())
            return pgsql.depth(conn, self.reactor.seconds())

        def counted(depth):
            self._depth = depth
            self._backlog_delta = 0
            n = depth["ready"] + depth["deferred"] + depth["active"]
            log.info("PostgreSQL queue holds {count} message(s)", count=n, event="recovered")
            self._poke()
            return n

        return self._run(hello).addCallback(counted)

    def claim(self, limit: int) -> Deferred:
        out: list[QueueEntry] = []
        while self._fresh and len(out) < limit:
            entry = self._fresh.popleft()
            self._leased.add(entry.qid)
            out.append(entry)
        if len(out) >= limit or not self._maybe_due or self._stopped:
            return succeed(out)
        self._maybe_due = False
        want = limit - len(out)
        d = self._run(self._claim_rows, want, self.reactor.seconds())

        def claimed(rows):
            if len(rows) >= want:
                self._maybe_due = True  # there may be more
            for row in rows:
                entry = self._from_row(row)
                if self._stopped:
                    continue  # its lease expires; another node (or the next start) takes it
                self._leased.add(entry.qid)
                out.append(entry)
            return out

        def failed(f):
            log.warn(
                "claiming queued messages failed: {error}; retrying in {delay:.0f}s",
                error=f.getErrorMessage(),
                delay=self.poll_interval,
                event="claim_failed",
            )
            self._poke_later(self.poll_interval)
            return out

        return d.addCallbacks(claimed, failed)

    def _claim_rows(self, conn, want: int, now: float) -> list[dict]:
        """Thread: claim, and open sealed rows (their trace headers, data keys)."""
        rows = pgsql.claim(conn, self.node, want, now, self.lease)
        for row in rows:
            seal = row["seal"] = self.bodies.opener(row["seal_header"], row["qid"])
            try:
                if isinstance(seal, Exception):
                    raise seal
                if seal is not None:
                    row["trace_headers"] = seal.open_extra(row["trace_headers"])
            except Exception as e:  # noqa: BLE001 (reading the body says why)
                row["trace_headers"], row["seal"] = b"", e
        return rows

    def _from_row(self, row: dict) -> QueueEntry:
        from mta.envelope import envelope_from_fields

        entry = self._entry(
            row["qid"],
            envelope_from_fields(row["envelope"]),
            row["trace_headers"],
            row["body_length"],
            row["created"],
            ref=row["body_ref"],
            seal=row["seal"],
        )
        for position, (status, result) in row["states"].items():
            if 0 <= position < len(entry.states):
                entry.states[position] = RecipientState(status)
                entry.details[position] = result
        entry.attempts = row["attempts"]
        entry.next_attempt = row["next_attempt"]
        entry.last_error = row["last_error"]
        entry.recovered = row["recovered"]
        return entry

    # -- returning leases ----------------------------------------------------------------

    def defer(self, entry: QueueEntry, next_attempt: float) -> Deferred:
        entry.body.forget_memory()
        d = self._returns.submit((pgsql.defer, (entry, self.node, self.reactor.seconds())))
        self._wait_until(next_attempt)
        return d.addBoth(self._returned, entry.qid, "defer")

    def finish(self, entry: QueueEntry) -> Deferred:
        entry.body.forget_memory()
        d = self._returns.submit((pgsql.finish, (entry, self.node)))
        return d.addBoth(self._returned, entry.qid, "finish")

    def bury(self, entry: QueueEntry, reason: str) -> Deferred:
        entry.body.forget_memory()
        d = self._returns.submit((pgsql.bury, (entry, self.node, reason, self.reactor.seconds())))
        return d.addBoth(self._returned, entry.qid, "bury")

    def _returned(self, result, qid: str, action: str):
        self._leased.discard(qid)  # renewals stop: on failure the lease expires
        if result is False:
            log.warn(
                "{qid}: lease lost before {action} (another node holds it, or it was"
                " deleted); recipients' final states were kept",
                qid=qid,
                action=action,
                event="lease_lost",
            )
        elif result is True and action != "defer":
            self._backlog_delta -= 1
        return None if isinstance(result, bool) else result

    # -- timers ---------------------------------------------------------------------------

    def _wait_until(self, due: float) -> None:
        heapq.heappush(self._due_times, due)
        self._arm()

    def _poke_later(self, delay: float) -> None:
        self._wait_until(self.reactor.seconds() + delay)

    def _arm(self) -> None:
        if self._stopped:
            return
        wake = self.reactor.seconds() + self.poll_interval
        if self._due_times:
            wake = min(wake, self._due_times[0])
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= wake:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, wake - self.reactor.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        while self._due_times and self._due_times[0] <= now:
            heapq.heappop(self._due_times)
        self._arm()
        self._poke()

    # -- maintenance: leases, heartbeat, depth ------------------------------------------

    def maintain(self) -> Deferred:
        """Renew this node's leases, beat the heart, refresh the cluster's depth."""
        held = sorted(self._leased | {e.qid for e in self._fresh})
        now = self.reactor.seconds()

        def work(conn):
            kept = pgsql.renew(conn, self.node, held, now, self.lease)
            self._heartbeat(conn, now)
            return kept, pgsql.depth(conn, now)

        def done(result):
            kept, depth = result
            for qid in set(held) - kept:
                if qid in self._leased:
                    log.warn("{qid}: lease lost while delivering", qid=qid, event="lease_lost")
            self._depth = depth
            self._backlog_delta = 0

        def failed(f):
            log.warn(
                "PostgreSQL queue maintenance failed: {error}",
                error=f.getErrorMessage(),
                event="maintenance_failed",
            )

        return self._run(work).addCallbacks(done, failed)

    def _heartbeat(self, conn, now: float) -> None:
        pgsql.heartbeat(
            conn,
            self.node,
            self.hostname,
            os.getpid(),
            mta.__version__,
            self._started,
            now,
        )

    def depth(self) -> dict[str, int]:
        out = {"incoming": len(self._fresh), **self._depth}
        out.setdefault("active", 0)
        out["active"] = max(out["active"], len(self._leased))
        for key in ("ready", "deferred"):
            out.setdefault(key, 0)
        return out

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def wait_idle(self) -> Deferred:
        return gatherResults(
            [self._writer.wait_idle(), self._returns.wait_idle(), *list(self._inflight)],
            consumeErrors=True,
        ).addErrback(lambda _: None)

    def probe(self) -> str:
        """Blocking: a round trip to the queue's tables proves a commit could work."""
        self.connections.run(lambda conn: conn.execute("SELECT 1 FROM queue_entries LIMIT 1"))
        where = f"PostgreSQL queue at {self.connections.where}"
        if self.bodies.s3 is not None:
            try:
                where += f", {self.bodies.probe()}"
            except Exception as e:
                raise OSError(f"queue bodies: {e}") from None
        return where

    def sweep(self) -> Deferred:
        """Delete orphaned S3 bodies (`mta.queue.s3body.S3Bodies.sweep`), in a thread."""
        now = self.reactor.seconds()
        d = deferToThreadPool(self.reactor, self._pool, self.bodies.sweep, self.connections, now)
        return d.addErrback(lambda f: log.warn("queue body sweep: {e}", e=f.getErrorMessage()))

    # -- per-recipient results at once ----------------------------------------------------

    def recording_agent(self, agent):
        """`agent` wrapped so that final results are committed at once."""
        from mta.queue.pgrecord import RecordingAgent

        return RecordingAgent(agent, self)

    def record_final(self, qid: str, results: list[tuple[int, str, str]]) -> Deferred:
        return self._returns.submit((pgsql.record_final, (qid, results, self.reactor.seconds())))
