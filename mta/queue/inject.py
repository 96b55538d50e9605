"""Putting a message into the queue from outside the SMTP path (a quarantine release).

`hold_message` writes a complete queue file (body, metadata, trailer; see
`mta.queue.entry`) into the first spool's ``hold/`` place durably: ``tmp/`` first,
fsync, rename, both directories fsynced.  A held entry is invisible to the runner
and to recovery, so this is safe while the server runs; the caller then releases it
with the ordinary ``release`` queue action (`IQueueControl.act`), which goes through
the running owner when there is one.  With a keyring (``[queue] encrypt``) the file
is sealed like the spool seals what it receives.
"""

from __future__ import annotations

import os
import time

from mta.crypto.stream import Sealer
from mta.fileio import fsync_dir, write_all
from mta.queue import entry as fmt
from mta.queue.ids import new_queue_id
from mta.queue.layout import HOLD, TMP


def hold_message(
    queue_root: str,
    envelope,
    message: bytes,
    trace_headers: bytes = b"",
    keyring=None,
    now: float | None = None,
) -> str:
    """Queue `message` (trace headers included) for `envelope`, on hold; its queue id."""
    qid = new_queue_id()
    created = time.time() if now is None else now
    pieces, sealed = [message], None
    if keyring is not None:
        sealer = Sealer(keyring, qid)
        pieces = sealer.seal_all([message])
        sealed = fmt.seal_fields(sealer, len(message), trace_headers)
    meta = fmt.encode_metadata(qid, envelope, trace_headers, len(message), created, sealed)
    stored = sealed["stored_length"] if sealed else len(message)
    tmp_dir, hold_dir = os.path.join(queue_root, TMP), os.path.join(queue_root, HOLD)
    os.makedirs(tmp_dir, mode=0o700, exist_ok=True)
    os.makedirs(hold_dir, mode=0o700, exist_ok=True)
    tmp = os.path.join(tmp_dir, qid)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, [*pieces, fmt.encode_trailer(meta, stored)])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, os.path.join(hold_dir, qid))
    fsync_dir(hold_dir)
    fsync_dir(tmp_dir)
    return qid
