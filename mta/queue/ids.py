"""Queue ids: unique, sortable by arrival, and naming the process that made them.

An id is hex: the time in µs (strictly increasing within a process), 24 bits of the
pid, a 16-bit counter.  The pid lets recovery tell a file a sibling worker is
writing right now from a leftover of a process that died.
"""

from __future__ import annotations

import itertools
import os
import re
import time

_QID_RE = re.compile(r"[0-9a-f]{8,64}\Z")
_counter = itertools.count()
_last_us = 0
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def new_queue_id() -> str:
    """Time in µs (strictly increasing in this process), pid, counter: hex, sortable."""
    global _last_us
    us = time.time_ns() // 1000
    if us <= _last_us:
        us = _last_us + 1
    _last_us = us
    return f"{us:013x}{_pid & 0xFFFFFF:06x}{next(_counter) & 0xFFFF:04x}"


def is_queue_id(name: str) -> bool:
    """True for names that can be queue ids (the only files a queue place may hold)."""
    return bool(_QID_RE.match(name))


def pid_of(qid: str) -> int | None:
    """The (24-bit) pid of the process that made `qid`, or None."""
    try:
        return int(qid[13:19], 16)
    except ValueError:
        return None
