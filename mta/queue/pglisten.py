"""`NotifyListener`: one dedicated connection LISTENing for new work, in a thread.

Nodes announce work another node may take (a commit this node does not lease to
itself, an operator's release or flush) with ``NOTIFY mta_queue, '<node id>'``.
An idle node sleeps in ``select()`` on this connection instead of polling the
table; its store still polls slowly (`PGQueueStore.poll_interval`) for what no
notification announces: retry times that came, and leases of dead nodes that
expired.  The thread reconnects by itself after PostgreSQL restarts, and reports
a reconnect as a notification (something may have been missed meanwhile).
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable

from mta.observe.logging import Logger
from mta.queue.pgconn import Connections, QueueUnavailable
from mta.queue.pgsql import CHANNEL

log = Logger()


class NotifyListener:
    """Calls `on_notify(payload)` on the reactor for each notification on the
    queue's channel; `payload` is None after a (re)connect."""

    def __init__(
        self,
        connections: Connections,
        reactor,
        on_notify: Callable[[str | None], None],
        *,
        retry: float = 5.0,
        idle_check: float = 30.0,
        tick: float = 1.0,
    ):
        self.connections = connections
        self.reactor = reactor
        self.on_notify = on_notify
        self.retry = retry
        self.idle_check = idle_check
        self.tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mta-pg-listen", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Blocking (joins the thread for at most `timeout` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _deliver(self, payload: str | None) -> None:
        if not self._stop.is_set():
            self.reactor.callFromThread(self.on_notify, payload)

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                conn = self.connections.connect(autocommit=True)
            except QueueUnavailable as e:
                if not failing:
                    log.warn("queue notifications: {error}", error=str(e), event="listen_failed")
                failing = True
                self._stop.wait(self.retry)
                continue
            try:
                self._listen(conn)
                failing = False
            except Exception as e:
                if not self._stop.is_set():
                    log.warn(
                        "queue notifications interrupted ({error}); reconnecting",
                        error=str(e).strip().splitlines()[0] if str(e).strip() else repr(e),
                        event="listen_failed",
                    )
                    failing = True
                    self._stop.wait(min(self.retry, 1.0))
            finally:
                self.connected.clear()
                try:
                    conn.close()
                except Exception:
                    pass

    def _listen(self, conn) -> None:
        conn.add_notify_handler(lambda n: self._deliver(n.payload))
        conn.execute(f"LISTEN {CHANNEL}")
        self.connected.set()
        self._deliver(None)  # (re)connected: something may have been missed
        idle = 0.0
        while not self._stop.is_set():
            readable, _, _ = select.select([conn.fileno()], [], [], self.tick)
            idle += self.tick
            if readable or idle >= self.idle_check:
                # Reading the socket runs the notify handler for what arrived (and
                # fails at once if PostgreSQL closed the connection).
                conn.execute("SELECT 1")
                idle = 0.0
