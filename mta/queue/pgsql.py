"""The PostgreSQL queue's statements: plain blocking functions of (conn, ..., now).

Every time is epoch seconds from the caller's clock (`now`), never PostgreSQL's
``now()``: nodes decide leases and retry times on their injected clock, so the
lease logic is tested with a fake one.  `mta.queue.pgstore` runs these on its thread
pool; `mta.queue.pgcontrol` and `mta-admin cluster status` call them directly.

Leases: `claim` takes due, unleased (or expired) entries with ``FOR UPDATE SKIP
LOCKED``, so two nodes claiming at once never get the same entry; `renew` extends
this node's leases; `defer`, `finish` and `bury` act only while the caller still
owns the lease (a node that lost it to another, after a stall longer than the
lease, changes nothing but the recipients' final states, which are true anyway).
"""

from __future__ import annotations

import json

from mta.envelope import RecipientState, envelope_fields

CHANNEL = "mta_queue"
FINAL = ("delivered", "failed")
NODE_MEMORY = 86400.0
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def insert_entry(
    conn,
    *,
    qid: str,
    envelope,
    trace_headers: bytes,
    body_length: int,
    created: float,
    lease_owner: str | None,
    lease_until: float | None,
    size: int | None = None,
    body_ref: str = "pg",
    seal_header: bytes | None = None,
    status: str = "active",
) -> None:
    """One committed message's row and one row per recipient (its body is stored
    by the caller: `mta.queue.pgbody.Places`).  `trace_headers` as stored (sealed
    with `seal_header`); `size` the clear trace headers and body."""
    fields = _COMPACT.encode(envelope_fields(envelope))
    conn.execute(
        "INSERT INTO queue_entries (id, envelope, trace_headers, body_length, size,"
        " next_attempt, lease_owner, lease_until, created, updated, body_ref, seal_header,"
        " status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            qid,
            fields,
            trace_headers,
            body_length,
            body_length + len(trace_headers) if size is None else size,
            created,
            lease_owner,
            lease_until,
            created,
            created,
            body_ref,
            seal_header,
            status,
        ),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO queue_recipients (entry_id, position, recipient, updated)"
            " VALUES (%s, %s, %s, %s)",
            [(qid, i, str(r), created) for i, r in enumerate(envelope.recipients)],
        )


def existing(conn, qids: list[str]) -> set[str]:
    """Those of `qids` that have a row (the S3 orphan sweep)."""
    rows = conn.execute("SELECT id FROM queue_entries WHERE id = ANY(%s)", (qids,))
    return {r[0] for r in rows.fetchall()}


def notify(conn, payload: str = "") -> None:
    """Wake idle nodes (delivered when the caller's transaction commits)."""
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def claim(conn, owner: str, limit: int, now: float, lease: float) -> list[dict]:
    """Lease up to `limit` due entries to `owner`; their rows with recipient states.

    ``recovered`` is true for an entry another lease held before (its node died or
    stalled mid-attempt): delivery then checks for copies it may already have made."""
    rows = conn.execute(
        "WITH due AS ("
        " SELECT id, lease_owner AS previous FROM queue_entries"
        " WHERE status = 'active' AND next_attempt <= %(now)s"
        " AND (lease_until IS NULL OR lease_until < %(now)s)"
        " ORDER BY next_attempt LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " UPDATE queue_entries q SET lease_owner = %(owner)s, lease_until = %(until)s"
        " FROM due WHERE q.id = due.id"
        " RETURNING q.id, q.envelope, q.trace_headers, q.body_length, q.attempts,"
        " q.next_attempt, q.last_error, q.created, due.previous, q.body_ref, q.seal_header",
        {"now": now, "limit": limit, "owner": owner, "until": now + lease},
    ).fetchall()
    return _with_recipients(conn, rows)


def load_leased(conn, owner: str, qids: list[str]) -> list[dict]:
    """Rows of `qids` this node leases (taken at commit), with recipient states."""
    rows = conn.execute(
        "SELECT id, envelope, trace_headers, body_length, attempts, next_attempt,"
        " last_error, created, NULL, body_ref, seal_header FROM queue_entries"
        " WHERE id = ANY(%s) AND lease_owner = %s AND status = 'active'",
        (qids, owner),
    ).fetchall()
    return _with_recipients(conn, rows)


def _with_recipients(conn, rows) -> list[dict]:
    if not rows:
        return []
    out = {}
    for qid, env, trace, length, attempts, next_attempt, last_error, created, prev, *place in rows:
        ref, seal = place
        out[qid] = {
            "body_ref": ref,
            "seal_header": None if seal is None else bytes(seal),
            "qid": qid,
            "envelope": env if isinstance(env, dict) else json.loads(env),
            "trace_headers": bytes(trace),
            "body_length": int(length),
            "attempts": int(attempts),
            "next_attempt": float(next_attempt),
            "last_error": last_error,
            "created": float(created),
            "recovered": prev is not None,
            "states": {},
        }
    for qid, position, status, result in conn.execute(
        "SELECT entry_id, position, status, result FROM queue_recipients WHERE entry_id = ANY(%s)",
        (list(out),),
    ):
        out[qid]["states"][position] = (status, result)
    return sorted(out.values(), key=lambda r: (r["next_attempt"], r["qid"]))


def record_final(conn, qid: str, results: list[tuple[int, str, str]], now: float) -> int:
    """Write final recipient states (position, delivered|failed, result) at once.

    Idempotent and unconditional on the lease: a recipient delivered is delivered,
    whoever holds the entry now; a final state is never overwritten."""
    count = 0
    with conn.cursor() as cur:
        for position, status, result in results:
            cur.execute(
                "UPDATE queue_recipients SET status = %s, result = %s, updated = %s"
                " WHERE entry_id = %s AND position = %s"
                " AND status NOT IN ('delivered', 'failed')",
                (status, result, now, qid, position),
            )
            count += cur.rowcount
    return count


def _states(entry) -> list[tuple[str, str, int, str]]:
    return [(s.value, d, i, entry.qid) for i, (s, d) in enumerate(zip(entry.states, entry.details))]


def _write_states(conn, entry, now: float) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE queue_recipients SET status = %s, result = %s, updated = %s"
            " WHERE entry_id = %s AND position = %s"
            " AND status NOT IN ('delivered', 'failed')",
            [(s, d, now, q, i) for s, d, i, q in _states(entry)],
        )


def defer(conn, entry, owner: str, now: float) -> bool:
    """Record an attempt and the next one; end the lease.  False: lease lost."""
    _write_states(conn, entry, now)
    cur = conn.execute(
        "UPDATE queue_entries SET attempts = %s, next_attempt = %s, last_error = %s,"
        " lease_owner = NULL, lease_until = NULL, updated = %s"
        " WHERE id = %s AND lease_owner = %s",
        (entry.attempts, entry.next_attempt, entry.last_error, now, entry.qid, owner),
    )
    return cur.rowcount == 1


def finish(conn, entry, owner: str) -> bool:
    """Every recipient is done: the entry leaves the queue (its ``queue_bodies``
    rows with it; an S3 body is deleted by the caller after the COMMIT).  False:
    lease lost."""
    cur = conn.execute(
        "DELETE FROM queue_entries WHERE id = %s AND lease_owner = %s", (entry.qid, owner)
    )
    return cur.rowcount == 1


def bury(conn, entry, owner: str, reason: str, now: float) -> bool:
    """Keep the entry as a dead letter with `reason`.  False: lease lost."""
    _write_states(conn, entry, now)
    cur = conn.execute(
        "UPDATE queue_entries SET status = 'dead', dead_reason = %s, attempts = %s,"
        " last_error = %s, lease_owner = NULL, lease_until = NULL, updated = %s"
        " WHERE id = %s AND lease_owner = %s",
        (reason, entry.attempts, entry.last_error, now, entry.qid, owner),
    )
    return cur.rowcount == 1


def renew(conn, owner: str, qids: list[str], now: float, lease: float) -> set[str]:
    """Extend this node's leases on `qids`; the ones it still holds."""
    if not qids:
        return set()
    rows = conn.execute(
        "UPDATE queue_entries SET lease_until = %s WHERE id = ANY(%s) AND lease_owner = %s"
        " RETURNING id",
        (now + lease, qids, owner),
    ).fetchall()
    return {r[0] for r in rows}


def release(conn, owner: str, qids: list[str]) -> int:
    """Give leases back (the node stops before trying them)."""
    if not qids:
        return 0
    cur = conn.execute(
        "UPDATE queue_entries SET lease_owner = NULL, lease_until = NULL"
        " WHERE id = ANY(%s) AND lease_owner = %s",
        (qids, owner),
    )
    return cur.rowcount


def depth(conn, now: float) -> dict[str, int]:
    """The cluster's queue by state: active (leased now), ready, deferred, hold, dead."""
    row = conn.execute(
        "SELECT"
        " count(*) FILTER (WHERE status = 'active' AND lease_until >= %(now)s),"
        " count(*) FILTER (WHERE status = 'active' AND next_attempt <= %(now)s"
        "   AND (lease_until IS NULL OR lease_until < %(now)s)),"
        " count(*) FILTER (WHERE status = 'active' AND next_attempt > %(now)s"
        "   AND (lease_until IS NULL OR lease_until < %(now)s)),"
        " count(*) FILTER (WHERE status = 'hold'),"
        " count(*) FILTER (WHERE status = 'dead')"
        " FROM queue_entries",
        {"now": now},
    ).fetchone()
    return dict(zip(("active", "ready", "deferred", "hold", "dead"), map(int, row)))


def heartbeat(conn, node: str, hostname: str, pid: int, version: str, started: float, now: float):
    conn.execute(
        "INSERT INTO queue_nodes (node_id, hostname, pid, version, started, last_seen)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (node_id) DO UPDATE SET last_seen = EXCLUDED.last_seen",
        (node, hostname, pid, version, started, now),
    )
    # Nodes that vanished without a word (kill -9) are listed as gone for a day.
    conn.execute("DELETE FROM queue_nodes WHERE last_seen < %s", (now - NODE_MEMORY,))


def leave(conn, node: str) -> None:
    conn.execute("DELETE FROM queue_nodes WHERE node_id = %s", (node,))


def nodes(conn, now: float) -> list[dict]:
    """Every node row with its live lease count, newest heartbeat first."""
    rows = conn.execute(
        "SELECT n.node_id, n.hostname, n.pid, n.version, n.started, n.last_seen,"
        " (SELECT count(*) FROM queue_entries q"
        "  WHERE q.lease_owner = n.node_id AND q.lease_until >= %s)"
        " FROM queue_nodes n ORDER BY n.last_seen DESC, n.node_id",
        (now,),
    ).fetchall()
    keys = ("node_id", "hostname", "pid", "version", "started", "last_seen", "leases")
    return [dict(zip(keys, r)) for r in rows]


def state_of(value: str) -> RecipientState:
    return RecipientState(value)
