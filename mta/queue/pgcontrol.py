"""`PGQueueControl`: `mta-admin queue ...` on the cluster's PostgreSQL queue.

Any node (or any machine with the DSN) sees and changes the whole cluster's queue:
there is no owner process to go through, because the table is the schedule.  An
action is one transaction; what a node is delivering right now is not waited for:
`hold` and `delete` of a leased entry take effect at once in the table, and the
attempt in flight finds its lease gone when it ends (its recipients' final states
were recorded as it went; see `mta.queue.pgstore`).  Actions that make work due
(flush, retry, release, requeue) NOTIFY the nodes so an idle one starts at once.
Blocking, like every `IQueueControl`; times are the wall clock.
"""

from __future__ import annotations

import time

from zope.interface import implementer

from mta.crypto.keys import DecryptionError
from mta.envelope import envelope_from_fields
from mta.interfaces import IQueueControl
from mta.queue import pgsql
from mta.queue.control import ACTIONS, ControlError
from mta.queue.ids import is_queue_id, new_queue_id
from mta.queue.pgbody import PGBody, Places
from mta.queue.pgconn import Connections, QueueUnavailable
from mta.queue.pgspool import CommitJob, insert_held

_STATE = {"active": "active", "hold": "hold", "dead": "dead"}


@implementer(IQueueControl)
class PGQueueControl:
    """`IQueueControl` over the queue tables at `dsn`."""

    def __init__(self, dsn: str, *, clock=time.time, places: Places | None = None):
        self.connections = Connections(dsn, size=1)
        self.clock = clock
        self.places = places or Places()  # where bodies are (mta.queue.pgopen)

    def _run(self, job, *args):
        try:
            return self.connections.run(job, *args)
        except QueueUnavailable as e:
            raise ControlError(str(e)) from None
        except Exception as e:
            if type(e).__module__.startswith("psycopg"):
                raise ControlError(
                    f"PostgreSQL queue at {self.connections.where}: {str(e).strip()}"
                ) from None
            raise

    def close(self) -> None:
        self.connections.close()
        self.places.close()

    # -- reading ----------------------------------------------------------------------

    def list(self, dead=None) -> list:
        from mta.queue.inspect import EntrySummary, RecipientSummary

        where = {None: "", True: " WHERE e.status = 'dead'", False: " WHERE e.status <> 'dead'"}
        rows = self._run(
            lambda c: c.execute(
                "SELECT e.id, e.status, e.created, e.size, e.envelope, e.attempts,"
                " e.last_error, e.dead_reason, e.next_attempt,"
                " coalesce(array_agg(r.recipient ORDER BY r.position), '{}'),"
                " coalesce(array_agg(r.status ORDER BY r.position), '{}'),"
                " coalesce(array_agg(r.result ORDER BY r.position), '{}')"
                " FROM queue_entries e LEFT JOIN queue_recipients r ON r.entry_id = e.id"
                + where[dead]
                + " GROUP BY e.id ORDER BY e.created, e.id"
            ).fetchall()
        )
        out = []
        for qid, status, created, size, env, attempts, error, reason, nxt, rc, st, rs in rows:
            sender = env.get("sender", ["", ""])
            state = status
            if status == "active":
                state = "deferred" if attempts else "active"
            out.append(
                EntrySummary(
                    qid=qid,
                    state=state,
                    created=float(created),
                    size=int(size),
                    sender="@".join(sender) if sender and sender[0] else "<>",
                    recipients=tuple(RecipientSummary(a, s, d) for a, s, d in zip(rc, st, rs) if a),
                    attempts=int(attempts),
                    last_error=reason if status == "dead" and reason else error,
                    next_attempt=float(nxt),
                )
            )
        return out

    def show(self, qid: str) -> str:
        _check_qid(qid)

        def read(conn):
            row = conn.execute(
                "SELECT envelope, trace_headers, body_length, size, status, attempts,"
                " next_attempt, last_error, dead_reason, lease_owner, lease_until, created,"
                " body_ref, seal_header FROM queue_entries WHERE id = %s",
                (qid,),
            ).fetchone()
            if row is None:
                return None, []
            states = conn.execute(
                "SELECT position, status, result FROM queue_recipients WHERE entry_id = %s"
                " ORDER BY position",
                (qid,),
            ).fetchall()
            return row, states

        row, states = self._run(read)
        if row is None:
            raise ControlError(f"{qid}: no such message in the queue")
        (
            env_fields,
            trace,
            length,
            size,
            status,
            attempts,
            nxt,
            error,
            reason,
            owner,
            until,
            created,
            ref,
            seal_header,
        ) = row
        env = envelope_from_fields(env_fields)
        stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))  # noqa: E731
        lines = [
            f"Queue ID:   {qid}",
            f"Place:      {status} (PostgreSQL queue at {self.connections.where})",
            f"Arrived:    {stamp(created)}",
            f"Size:       {size}",
            f"Sender:     {env.sender.path}",
            f"Client:     {env.client_name or '-'} [{env.client_address or '-'}]"
            f" helo={env.helo or '-'}",
            f"Listener:   {env.listener or '-'}  TLS: {env.tls or 'no'}  "
            f"AUTH: {env.authenticated_as or '-'}",
            f"Attempts:   {attempts}",
        ]
        if status == "active":
            lines.append(f"Next try:   {stamp(nxt)}")
        if owner and until and until >= self.clock():
            lines.append(f"Leased to:  {owner} until {stamp(until)}")
        if reason or error:
            lines.append(f"Reason:     {reason or error}")
        lines.append("Recipients:")
        by_position = {p: (s, r) for p, s, r in states}
        for i, rcpt in enumerate(env.recipients):
            state, detail = by_position.get(i, ("pending", ""))
            lines.append(f"  {rcpt.path} [{state}]{': ' + detail if detail else ''}")
        lines.append("Headers:")
        seal = self.places.opener(None if seal_header is None else bytes(seal_header), qid)
        try:
            if isinstance(seal, Exception):
                raise seal
            trace = bytes(trace) if seal is None else seal.open_extra(bytes(trace))
            body = PGBody(
                trace, qid, int(length), self.connections, self.places, ref=ref, seal=seal
            )
            headers = body.header_block().decode("utf-8", "replace")
        except (QueueUnavailable, DecryptionError, OSError) as e:
            raise ControlError(f"{qid}: {e}") from None
        lines += ["  " + line for line in headers.replace("\r\n", "\n").rstrip("\n").split("\n")]
        return "\n".join(lines) + "\n"

    # -- acting -------------------------------------------------------------------------

    def act(self, action: str, qid=None) -> str:
        if action not in ACTIONS:
            raise ControlError(f"unknown queue command {action!r}")
        if action == "flush":
            count = self._run(_flush, self.clock())
            return f"{count} deferred message(s) scheduled now"
        if qid is None:
            raise ControlError(f"queue {action} needs a queue id")
        _check_qid(qid)
        message = self._run(_ACTIONS[action], qid, self.clock())
        if isinstance(message, tuple):  # deleted: its body, when in S3, goes after the row
            message, ref = message
            self.places.forget([(qid, ref)])
        if message is None:
            raise ControlError(_MISSING[action].format(qid=qid))
        return message


def _check_qid(qid: str) -> None:
    if not isinstance(qid, str) or not is_queue_id(qid):
        raise ControlError(f"{qid!r} is not a queue id")


def _flush(conn, now: float) -> int:
    cur = conn.execute(
        "UPDATE queue_entries SET next_attempt = %s WHERE status = 'active' AND next_attempt > %s",
        (now, now),
    )
    pgsql.notify(conn, "control")
    return cur.rowcount


def _retry(conn, qid: str, now: float) -> str | None:
    cur = conn.execute(
        "UPDATE queue_entries SET next_attempt = least(next_attempt, %s)"
        " WHERE id = %s AND status = 'active' RETURNING lease_owner, lease_until",
        (now, qid),
    )
    row = cur.fetchone()
    if row is None:
        return None
    if row[0] and row[1] and row[1] >= now:
        return f"{qid} is already being tried (by {row[0]})"
    pgsql.notify(conn, "control")
    return f"{qid} scheduled now"


def _hold(conn, qid: str, now: float) -> str | None:
    cur = conn.execute(
        "UPDATE queue_entries SET status = 'hold', updated = %s WHERE id = %s"
        " AND status = 'active' RETURNING lease_owner, lease_until",
        (now, qid),
    )
    row = cur.fetchone()
    if row is None:
        return None
    if row[0] and row[1] and row[1] >= now:
        return f"{qid} held (an attempt running on {row[0]} may still complete it)"
    return f"{qid} held"


def _release(conn, qid: str, now: float) -> str | None:
    cur = conn.execute(
        "UPDATE queue_entries SET status = 'active', next_attempt = %s,"
        " lease_owner = NULL, lease_until = NULL, updated = %s"
        " WHERE id = %s AND status = 'hold'",
        (now, now, qid),
    )
    if cur.rowcount != 1:
        return None
    pgsql.notify(conn, "control")
    return f"{qid} released"


def _delete(conn, qid: str, now: float) -> str | None:
    cur = conn.execute("DELETE FROM queue_entries WHERE id = %s RETURNING status, body_ref", (qid,))
    row = cur.fetchone()
    return None if row is None else (f"{qid} deleted (was {_STATE.get(row[0], row[0])})", row[1])


def _requeue(conn, qid: str, now: float) -> str | None:
    """A dead letter back to the active queue, its failed recipients pending again and
    its age reset (else `max_age` would expire it at once)."""
    cur = conn.execute(
        "UPDATE queue_entries SET status = 'active', attempts = 0, next_attempt = %s,"
        " created = %s, dead_reason = '', last_error = '', lease_owner = NULL,"
        " lease_until = NULL, updated = %s WHERE id = %s AND status = 'dead'",
        (now, now, now, qid),
    )
    if cur.rowcount != 1:
        return None
    conn.execute(
        "UPDATE queue_recipients SET status = 'pending', result = '', updated = %s"
        " WHERE entry_id = %s AND status = 'failed'",
        (now, qid),
    )
    pgsql.notify(conn, "control")
    return f"{qid} requeued"


_ACTIONS = {
    "retry": _retry,
    "hold": _hold,
    "release": _release,
    "delete": _delete,
    "requeue": _requeue,
}
_MISSING = {
    "retry": "{qid} is not waiting in the active queue",
    "hold": "{qid} is not in the active queue",
    "release": "{qid} is not on hold",
    "delete": "{qid}: no such message in the queue",
    "requeue": "{qid} is not a dead letter",
}


def hold_message(
    dsn: str, envelope, message: bytes, trace_headers: bytes = b"", places: Places | None = None
) -> str:
    """Queue `message` on hold (a quarantine release; released with ``release``):
    its body stored where `places` (`mta.queue.pgopen.open_places`) says, like a
    received one; the queue id."""
    places = places or Places()
    now = time.time()
    job = CommitJob(
        new_queue_id(), envelope, trace_headers, len(message), [message], None, None, now
    )
    error = places.stage([job]).get(id(job))
    if error is not None:
        raise ControlError(f"cannot store the message: {error}") from None
    connections = Connections(dsn, size=1)
    try:
        connections.run(insert_held, places, job)
    except BaseException:
        places.unstage([job])
        raise
    finally:
        connections.close()
    return job.qid
