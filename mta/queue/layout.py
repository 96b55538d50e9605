"""Where the file queue keeps things: one spool directory per worker process.

``<datadir>/queue/`` is the first worker's spool, ``queue/w<k>/`` worker k's.  Each
spool has the places a message can be in (``active/``, ``hold/``, ``dead/``), the
receiving area (``tmp/``), finished files kept for reuse (``free/``) and the
command channel of its running owner (``control/``, see `mta.queue.control`).
"""

from __future__ import annotations

import os

ACTIVE = "active"
HOLD = "hold"
DEAD = "dead"
TMP = "tmp"
FREE = "free"
CONTROL = "control"
PLACES = (ACTIVE, HOLD, DEAD)  # where a committed message can be
STATUS_SUFFIX = ".status"


def spool_dir(queue_root: str, worker: int) -> str:
    """The spool owned by worker process `worker`: the queue root for the first,
    ``queue/w<k>/`` for the others (see mta.process.workers)."""
    return queue_root if worker == 0 else os.path.join(queue_root, f"w{worker}")


def worker_of(name: str) -> int | None:
    """The worker index of a ``w<k>`` directory name under the queue root, else None."""
    return int(name[1:]) if name[:1] == "w" and name[1:].isdigit() else None


def spool_dirs(queue_root: str) -> list[str]:
    """Every spool under the queue root: the first worker's and each other's."""
    try:
        names = os.listdir(queue_root)
    except FileNotFoundError:
        return [queue_root]
    others = sorted((worker_of(n), n) for n in names if worker_of(n) is not None)
    return [queue_root] + [os.path.join(queue_root, n) for _, n in others]
