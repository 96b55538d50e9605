"""`mta-admin key retire` and the queue: sealed entries under a key being retired.

Entries on hold and dead letters sit still, so their headers are re-wrapped under
the current key (`mta.crypto.stream.rewrap_file`).  Entries in ``active/`` may be
read by a running server at any moment; they are only counted, and the key stays
until the queue has delivered them (retire refuses and says how many are left).
"""

from __future__ import annotations

import os

from mta.crypto import stream
from mta.queue.ids import is_queue_id
from mta.queue.layout import ACTIVE, DEAD, HOLD, spool_dirs


def rekey_queue(queue_root: str, keyring, key_id: str, *, dry_run: bool = False) -> tuple[int, int]:
    """(entries re-wrapped in hold/ and dead/, active entries still under `key_id`);
    with `dry_run`, the first number counts what would be re-wrapped."""
    rewrapped = active = 0
    for root in spool_dirs(queue_root):
        for place in (ACTIVE, HOLD, DEAD):
            directory = os.path.join(root, place)
            try:
                names = sorted(n for n in os.listdir(directory) if is_queue_id(n))
            except FileNotFoundError:
                continue
            for name in names:
                path = os.path.join(directory, name)
                try:
                    if place == ACTIVE or dry_run:
                        with open(path, "rb") as f:
                            under = stream.header_key_id(f.read(stream.HEADER_SIZE)) == key_id
                        if under and place == ACTIVE:
                            active += 1
                        elif under:
                            rewrapped += 1
                    elif stream.rewrap_file(keyring, path, key_id):
                        rewrapped += 1
                except FileNotFoundError:
                    continue  # delivered (or moved) meanwhile
    return rewrapped, active
