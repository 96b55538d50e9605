"""What a spool looks like after a crash, and how a starting process takes it over.

`scan` runs once when a spool's owner starts: anything in ``tmp/`` was never
acknowledged and is deleted (unless a live sibling is writing it), finished files in
``free/`` are kept for reuse, half-done dead-lettering is completed, and every
queued message in ``active/`` is reported with the time its next attempt is due.

`adopt_orphaned_spools` runs before any worker starts: spools of workers that no
longer exist (``workers`` was lowered) are merged into the first worker's.
"""

from __future__ import annotations

import os
import shutil

from mta.fileio import pid_alive
from mta.observe.logging import Logger
from mta.queue import entry as fmt
from mta.queue.files import unlink_quietly
from mta.queue.ids import is_queue_id, pid_of
from mta.queue.layout import ACTIVE, DEAD, FREE, HOLD, PLACES, STATUS_SUFFIX, TMP, worker_of

log = Logger()


def scan(root: str, live: set[str], free, max_free: int) -> list[tuple[float, str]]:
    """Blocking: tidy spool `root` and return ``[(due, qid)]`` for ``active/``, oldest
    first.  `live` holds the qids being received in this process right now; names
    kept for reuse are appended to `free` as ``(name, 0)`` up to `max_free`."""
    mypid = os.getpid()
    tmp_dir, free_dir, active_dir, dead_dir = (
        f"{root}/{TMP}",
        f"{root}/{FREE}",
        f"{root}/{ACTIVE}",
        f"{root}/{DEAD}",
    )
    queued = _queued_inodes(root)
    for entry in os.scandir(tmp_dir):
        name = entry.name
        pid = pid_of(name)
        if name in live or (pid is not None and pid != mypid and pid_alive(pid)):
            continue  # being received right now, here or in a sibling process
        if _also_queued(entry, queued):
            continue
        log.info("removing incomplete spool file {name}", name=name, event="tmp_removed")
        unlink_quietly(entry.path)
    for entry in os.scandir(free_dir):
        if _also_queued(entry, queued):
            continue
        if len(free) < max_free:
            free.append((entry.name, 0))
        else:
            unlink_quietly(entry.path)
    names = set(os.listdir(active_dir))
    found = []
    for name in names:
        if name.endswith(STATUS_SUFFIX):
            qid = name[: -len(STATUS_SUFFIX)]
            if qid not in names:
                # Interrupted dead-lettering, or a finished entry: tidy up.
                src = os.path.join(active_dir, name)
                if os.path.exists(os.path.join(dead_dir, qid)):
                    os.rename(src, os.path.join(dead_dir, name))
                else:
                    unlink_quietly(src)
        elif is_queue_id(name):
            status = fmt.read_status(f"{active_dir}/{name}{STATUS_SUFFIX}")
            due = float(status.get("next_attempt", 0.0)) if status else 0.0
            found.append((due, name))
    found.sort(key=lambda t: t[1])
    return found


def _queued_inodes(root: str) -> set[int]:
    """Inode numbers of every queued message (active, on hold, dead)."""
    inodes = set()
    for place in PLACES:
        with os.scandir(f"{root}/{place}") as it:
            inodes.update(e.inode() for e in it)
    return inodes


def _also_queued(entry: os.DirEntry, queued: set[int]) -> bool:
    """True for a tmp/ or free/ name that is a second name of a queued message.

    A rename writes two directories; after a power cut on a file system without a
    journal only the one that was fsynced (the destination) is sure to be on disk,
    so the old name can come back next to the new one (fsck counts both links).
    Deleting that name is harmless only if fsck ran, and reusing it would overwrite
    a message we acknowledged: leave it alone and say so."""
    if entry.inode() not in queued:
        return False
    log.warn(
        "{path} is a second name of a queued message (a rename cut short by a crash);"
        " left alone, remove it by hand once the message is delivered",
        path=entry.path,
        event="spool_alias",
    )
    return True


def adopt_orphaned_spools(queue_root: str, workers: int) -> int:
    """Move entries of workers that no longer exist into the first worker's spool.

    Runs once at startup, before any spool or worker exists, so it races with
    nothing.  Returns how many files moved."""
    moved = 0
    try:
        names = os.listdir(queue_root)
    except FileNotFoundError:
        return 0
    for name in names:
        index = worker_of(name)
        if index is None or index < workers:
            continue
        os.makedirs(os.path.join(queue_root, ACTIVE), mode=0o700, exist_ok=True)
        for place in (ACTIVE, DEAD, HOLD):
            src = os.path.join(queue_root, name, place)
            dst = os.path.join(queue_root, place)
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
