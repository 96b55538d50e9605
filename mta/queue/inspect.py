"""Read-only view of a queue directory, like Postfix's ``mailq``.

Used by ``mta-admin queue list`` / ``queue dead`` while the server runs: it only
reads committed files (``active/`` and ``dead/``) and tolerates entries vanishing
under it, so it never interferes with the spool.
"""

from __future__ import annotations

import os
import time

import attrs

from mta.queue.entry import CorruptEntry, is_queue_id, read_entry, read_status
from mta.queue.layout import STATUS_SUFFIX, spool_dirs


@attrs.frozen
class RecipientSummary:
    address: str
    state: str
    detail: str = ""


@attrs.frozen
class EntrySummary:
    qid: str
    state: str  # "active" (never tried), "deferred", "dead" or "corrupt"
    created: float
    size: int
    sender: str
    recipients: tuple[RecipientSummary, ...]
    attempts: int = 0
    last_error: str = ""
    next_attempt: float = 0.0


def list_entries(queue_dir: str, *, dead: bool | None = None) -> list[EntrySummary]:
    """Summaries of queued entries, oldest first.  `dead`: None = both live and dead
    entries, True = only dead letters, False = only live ones."""
    out: list[EntrySummary] = []
    places = []
    roots = spool_dirs(queue_dir)  # each worker process owns one
    for root in roots:
        if dead is not True:
            places.append(("active", os.path.join(root, "active")))
        if dead is not False:
            places.append(("dead", os.path.join(root, "dead")))
    for where, directory in places:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        for name in names:
            if is_queue_id(name):
                summary = _summarize(os.path.join(directory, name), name, where)
                if summary is not None:
                    out.append(summary)
    out.sort(key=lambda s: (s.created, s.qid))
    return out


def _summarize(path: str, qid: str, where: str) -> EntrySummary | None:
    try:
        entry = read_entry(path)
    except FileNotFoundError:
        return None  # delivered while we looked
    except (CorruptEntry, OSError) as e:
        status = read_status(path + STATUS_SUFFIX) or {}
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        return EntrySummary(
            qid, "corrupt", 0.0, size, "?", (), last_error=str(status.get("reason", e))
        )
    if where == "dead":
        state = "dead"
        status = read_status(path + STATUS_SUFFIX) or {}
        last_error = str(status.get("reason", entry.last_error))
    else:
        state = "deferred" if entry.attempts else "active"
        last_error = entry.last_error
    rcpts = tuple(
        RecipientSummary(str(r), s.value, d)
        for r, s, d in zip(entry.envelope.recipients, entry.states, entry.details)
    )
    return EntrySummary(
        qid=qid,
        state=state,
        created=entry.created,
        size=entry.size,
        sender=str(entry.envelope.sender) or "<>",
        recipients=rcpts,
        attempts=entry.attempts,
        last_error=last_error,
        next_attempt=entry.next_attempt,
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_listing(summaries: list[EntrySummary], now: float | None = None) -> str:
    """A ``mailq``-style listing; ends with a count line."""
    now = time.time() if now is None else now
    if not summaries:
        return "Mail queue is empty\n"
    lines = [f"{'Queue ID':<24} {'State':<8} {'Age':>7} {'Size':>9}  Sender"]
    total = 0
    for s in summaries:
        total += s.size
        lines.append(f"{s.qid:<24} {s.state:<8} {_age(now - s.created):>7} {s.size:>9}  {s.sender}")
        if s.last_error:
            lines.append(f"    ({s.last_error})")
        if s.state == "deferred" and s.next_attempt:
            lines.append(
                f"    next attempt in {_age(s.next_attempt - now)} (after {s.attempts} attempt(s))"
            )
        for r in s.recipients:
            detail = (
                f"  {r.detail}"
                if r.detail and r.state not in ("pending",) and r.detail != s.last_error
                else ""
            )
            lines.append(f"    {r.address}  [{r.state}]{detail}")
        lines.append("")
    kb = (total + 1023) // 1024
    lines.append(f"-- {kb} Kbytes in {len(summaries)} Request{'s' if len(summaries) != 1 else ''}.")
    return "\n".join(lines) + "\n"
