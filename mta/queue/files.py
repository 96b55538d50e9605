"""Blocking file operations on the places of one spool (active, hold, dead).

Every move of a committed message goes through `move_entry`: the queue file and its
``.status`` record travel together, and the destination directory is fsynced before
the source, so a crash leaves the message in one place or the other, never lost.
The spool's batches, queue control and recovery all use these; the server runs them
on its thread pool, `mta-admin` directly while no server owns the spool.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from mta.envelope import RecipientState
from mta.fileio import fsync_dir, write_all
from mta.queue import entry as fmt
from mta.queue.layout import ACTIVE, DEAD, PLACES, STATUS_SUFFIX


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def append_status(path: str, line: bytes, fsync: Callable[[int], None] = os.fsync) -> bool:
    """Append one status record (fsynced); True when the file had to be created (its
    directory then needs an fsync too)."""
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        created = True
    try:
        write_all(fd, [line])
        fsync(fd)
    finally:
        os.close(fd)
    return created


def move_entry(
    root: str,
    qid: str,
    src: str,
    dst: str,
    *,
    status_line: bytes | None = None,
    fsync: Callable[[int], None] = os.fsync,
    sync_dirs: bool = True,
) -> bool:
    """Move `qid` and its status record from place `src` to place `dst` of spool
    `root`, first appending `status_line` (the reason, for a dead letter) when given.
    False when `qid` is not in `src`.  With `sync_dirs` false the caller fsyncs both
    directories itself (once for a whole batch)."""
    src_dir, dst_dir = f"{root}/{src}", f"{root}/{dst}"
    path = f"{src_dir}/{qid}"
    if not os.path.exists(path):
        return False
    os.makedirs(dst_dir, mode=0o700, exist_ok=True)
    if status_line is not None:
        append_status(path + STATUS_SUFFIX, status_line, fsync)
    try:
        os.rename(path, f"{dst_dir}/{qid}")
    except FileNotFoundError:
        return False
    try:
        os.rename(path + STATUS_SUFFIX, f"{dst_dir}/{qid}{STATUS_SUFFIX}")
    except FileNotFoundError:
        pass
    if sync_dirs:
        fsync_dir(dst_dir, fsync)
        fsync_dir(src_dir, fsync)
    return True


def reason_line(reason: str) -> bytes:
    """A status record that only says why (for a file too damaged to read)."""
    return b'{"version":1,"reason":%s}\n' % json.dumps(reason).encode("ascii")


def delete_entry(root: str, qid: str) -> str | None:
    """Delete `qid` wherever it is in spool `root`; the place it was in, or None."""
    for place in PLACES:
        path = os.path.join(root, place, qid)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        unlink_quietly(path + STATUS_SUFFIX)
        fsync_dir(os.path.join(root, place))
        return place
    return None


def requeue_entry(root: str, qid: str, now: float) -> bool:
    """Dead letter -> active: failed recipients pending again, age counted from `now`
    (else ``max_age`` would expire it at once).  False when `qid` is not dead.
    Raises CorruptEntry for a file that cannot be read."""
    path = os.path.join(root, DEAD, qid)
    try:
        entry = fmt.read_entry(path)
    except FileNotFoundError:
        return False
    # Rewrite the trailer in place with the new creation time (the body stays).
    meta = fmt.encode_metadata(
        qid, entry.envelope, entry.trace_headers, entry.body_length, now, entry.sealed
    )
    stored = entry.stored_length  # (a sealed entry's trace headers stay sealed in `sealed`)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, stored)
        os.pwrite(fd, fmt.encode_trailer(meta, stored), stored)
        os.fsync(fd)
    finally:
        os.close(fd)
    for i, state in enumerate(entry.states):
        if state is not RecipientState.DELIVERED:
            entry.states[i] = RecipientState.PENDING
            entry.details[i] = ""
    entry.attempts, entry.next_attempt, entry.last_error = 0, 0.0, ""
    status = path + STATUS_SUFFIX
    with open(status + ".tmp", "wb") as f:
        f.write(fmt.encode_status(entry))
        f.flush()
        os.fsync(f.fileno())
    os.rename(status + ".tmp", status)
    return move_entry(root, qid, DEAD, ACTIVE)


def make_due(root: str, qid: str | None = None) -> int:
    """Record next_attempt 0 for deferred entries (all, or `qid`) of spool `root`, so
    the next start tries them at once; how many were changed."""
    count = 0
    active = os.path.join(root, ACTIVE)
    names = [qid] if qid else sorted(n for n in os.listdir(active) if fmt.is_queue_id(n))
    for name in names:
        status_path = os.path.join(active, name + STATUS_SUFFIX)
        status = fmt.read_status(status_path)
        if status is None or not status.get("next_attempt"):
            continue
        status["next_attempt"] = 0.0
        append_status(
            status_path, json.dumps(status, separators=(",", ":")).encode("ascii") + b"\n"
        )
        count += 1
    return count
