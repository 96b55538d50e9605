"""The on-disk format of one queued message, and `QueueEntry`, its in-memory form.

One committed message is ONE file, ``queue/active/<qid>``::

    <body bytes: exactly body_length>            offset 0, what delivery copies
    <metadata: versioned JSON, utf-8>
    <footer: "\\nMTA-QUEUE 1 <body_length:016x> <meta_length:08x>\\n">

Why one file with a trailer rather than body + ``.json`` sidecar: acceptance costs
one create, one write, one fsync and one rename per message (plus one directory fsync
per group-commit batch), and a spilled 20 MB body is committed by appending the
trailer to the spill file instead of copying it.  The body starts at offset 0, so a
store copies ``[0, body_length)`` straight from the file (sendfile/copy_file_range);
the trace headers (``Received:``) live in the metadata and are sent as a prefix.
The rename into ``active/`` is the commit point: anything in ``tmp/`` was never
acknowledged and is deleted by recovery.  The footer lets a reader reject a file
whose size does not add up instead of trusting it.

Per-recipient progress is an append-only ``active/<qid>.status`` file, created only
when an attempt leaves recipients unfinished: one JSON line per snapshot, fsynced;
the last complete line wins, so a torn append falls back to the previous snapshot.
A finished entry is unlinked; one with permanently failed recipients moves (with its
status, which holds the reason) to ``queue/dead/``.  Never pickle.
"""

from __future__ import annotations

import base64
import json
import os
import re

import attrs

from mta.crypto import stream
from mta.crypto.keys import DecryptionError
from mta.envelope import (
    Address,
    DeliveryJob,
    DeliveryResult,
    Envelope,
    RecipientState,
    envelope_fields,
    envelope_from_fields,
)
from mta.queue.body import FileBody
from mta.queue.ids import is_queue_id
from mta.queue.layout import STATUS_SUFFIX

__all__ = ["STATUS_SUFFIX", "CorruptEntry", "QueueEntry", "is_queue_id"]

FORMAT_VERSION = 1
_FOOTER_RE = re.compile(rb"\nMTA-QUEUE 1 ([0-9a-f]{16}) ([0-9a-f]{8})\n\Z")
FOOTER_LENGTH = len(b"\nMTA-QUEUE 1 %016x %08x\n" % (0, 0))
FINAL_STATES = (RecipientState.DELIVERED, RecipientState.FAILED)


class CorruptEntry(ValueError):
    """A queue file whose trailer or metadata cannot be trusted."""


@attrs.define(eq=False)
class QueueEntry:
    """A queued message: envelope, where its body is, and per-recipient progress.

    `states`/`details` run parallel to `envelope.recipients`.  `recovered` is true for
    an entry found on disk at startup, whose last attempt may have been interrupted
    after delivering but before its status was recorded.
    """

    qid: str
    envelope: Envelope
    path: str
    body_length: int
    trace_headers: bytes = b""
    created: float = 0.0
    states: list[RecipientState] = attrs.Factory(list)
    details: list[str] = attrs.Factory(list)
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    recovered: bool = False
    has_status: bool = False  # a .status file exists next to the queue file
    # ``[queue] encrypt``: the metadata's "sealed" table (stored length, sealed trace
    # headers); None for a clear file.  See mta.crypto.stream.
    sealed: dict | None = None
    # Size of the queue file (body + trailer) when known, else 0: lets the spool reuse
    # the file for another message without a truncate when that one is as long.
    file_size: int = 0
    # How delivery reads the message (`IMessageBody`).  Right after a commit a small
    # message's body is still in memory and the FileBody holds it; the store drops
    # it (`FileBody.forget_memory`) for entries that have to wait and after the first
    # attempt, so only messages being delivered right now hold one.
    body: FileBody = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        n = len(self.envelope.recipients)
        if not self.states:
            self.states = [RecipientState.PENDING] * n
        if not self.details:
            self.details = [""] * n
        if self.body is None:
            self.body = FileBody(self.trace_headers, self.path, self.body_length)

    @property
    def stored_length(self) -> int:
        """Bytes of the body region in the file (more than body_length when sealed)."""
        return self.body_length if self.sealed is None else int(self.sealed["stored_length"])

    @property
    def size(self) -> int:
        """Bytes of the message as delivered (trace headers + body)."""
        return len(self.trace_headers) + self.body_length

    def job(self) -> DeliveryJob:
        """The immutable view delivery gets for one attempt."""
        return DeliveryJob(
            self.qid,
            self.envelope,
            self.body,
            tuple(self.states),
            self.attempts,
            self.recovered or self.attempts > 0,
        )

    def pending_recipients(self) -> list[Address]:
        """Recipients still to deliver, each address once, in envelope order."""
        seen: dict[Address, None] = {}
        for rcpt, state in zip(self.envelope.recipients, self.states):
            if state not in FINAL_STATES:
                seen.setdefault(rcpt, None)
        return list(seen)

    @property
    def is_finished(self) -> bool:
        return all(s in FINAL_STATES for s in self.states)

    @property
    def has_failures(self) -> bool:
        return any(s is RecipientState.FAILED for s in self.states)

    def apply(self, results: list[DeliveryResult]) -> dict[RecipientState, list[Address]]:
        """Record results; returns the recipients whose state changed, by new state."""
        by_address = {r.recipient: r for r in results}
        changed: dict[RecipientState, list[Address]] = {}
        for i, rcpt in enumerate(self.envelope.recipients):
            if self.states[i] in FINAL_STATES:
                continue
            result = by_address.get(rcpt)
            if result is None:
                continue
            state = result.state
            if state is RecipientState.PENDING:
                state = RecipientState.DEFERRED
            detail = result.detail or (str(result.reply) if result.reply else "")
            if state is not self.states[i] or detail != self.details[i]:
                changed.setdefault(state, []).append(rcpt)
            self.states[i] = state
            self.details[i] = detail
            if state is not RecipientState.DELIVERED and detail:
                self.last_error = detail
        return changed

    def fail_remaining(self, reason: str) -> list[Address]:
        """Permanently fail every unfinished recipient (queue lifetime exceeded)."""
        failed = []
        for i, state in enumerate(self.states):
            if state not in FINAL_STATES:
                self.states[i] = RecipientState.FAILED
                self.details[i] = reason
                failed.append(self.envelope.recipients[i])
        self.last_error = reason
        return failed


# -- encoding ------------------------------------------------------------------


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def encode_metadata(
    qid: str,
    envelope: Envelope,
    trace_headers: bytes,
    body_length: int,
    created: float,
    sealed: dict | None = None,
) -> bytes:
    """The JSON metadata that follows the body in the queue file.  A sealed file
    (`sealed`: see `seal_fields`) keeps its trace headers there, not in clear."""
    meta = {
        "version": FORMAT_VERSION,
        "qid": qid,
        **envelope_fields(envelope),
        "created": created,
        "body_length": body_length,
        "trace_headers": "" if sealed else trace_headers.decode("utf-8", "surrogateescape"),
    }
    if sealed:
        meta["sealed"] = sealed
    return _COMPACT.encode(meta).encode("ascii")


def seal_fields(sealer, body_length: int, trace_headers: bytes) -> dict:
    """The metadata's "sealed" table for a body sealed by `sealer`."""
    trace = base64.b64encode(sealer.seal_extra(trace_headers)).decode("ascii")
    return {"stored_length": stream.stored_length(body_length), "trace": trace}


def encode_trailer(meta: bytes, body_length: int) -> bytes:
    """Metadata + footer, appended right after the body."""
    return meta + b"\nMTA-QUEUE 1 %016x %08x\n" % (body_length, len(meta))


def decode_metadata(meta: dict, path: str) -> QueueEntry:
    if meta.get("version") != FORMAT_VERSION:
        raise CorruptEntry(f"{path}: unsupported metadata version {meta.get('version')!r}")
    try:
        envelope = envelope_from_fields(meta)
        return QueueEntry(
            qid=meta["qid"],
            envelope=envelope,
            path=path,
            body_length=int(meta["body_length"]),
            trace_headers=meta.get("trace_headers", "").encode("utf-8", "surrogateescape"),
            created=float(meta.get("created", envelope.received_at)),
            sealed=_sealed_fields(meta.get("sealed"), int(meta["body_length"])),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise CorruptEntry(f"{path}: bad metadata: {e}") from None


def _sealed_fields(sealed, body_length: int) -> dict | None:
    if sealed is None:
        return None
    stored = int(sealed["stored_length"])
    if stored != stream.stored_length(body_length) or not isinstance(sealed["trace"], str):
        raise ValueError("sealed lengths do not add up")
    return {"stored_length": stored, "trace": sealed["trace"]}


def read_entry(path: str, status_path: str | None = None, keyring=None) -> QueueEntry:
    """Load a committed queue file (blocking) and apply its latest status snapshot.

    A sealed file (``[queue] encrypt``) needs `keyring` for its body and trace
    headers; without one (`mta-admin queue list`) its envelope still reads, and
    reading its body raises DecryptionError saying so.  Raises FileNotFoundError
    when it is gone, CorruptEntry when it cannot be trusted, DecryptionError when
    it cannot be decrypted.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size < FOOTER_LENGTH:
            raise CorruptEntry(f"{path}: too short for a queue file")
        m = _FOOTER_RE.match(os.pread(fd, FOOTER_LENGTH, size - FOOTER_LENGTH))
        if not m:
            raise CorruptEntry(f"{path}: no queue footer")
        body_length, meta_length = int(m.group(1), 16), int(m.group(2), 16)
        if body_length + meta_length + FOOTER_LENGTH != size:
            raise CorruptEntry(f"{path}: length mismatch")
        raw = os.pread(fd, meta_length, body_length)
        head = os.pread(fd, stream.HEADER_SIZE, 0) if b'"sealed"' in raw else b""
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CorruptEntry(f"{path}: bad metadata JSON: {e}") from None
    entry = decode_metadata(meta, path)
    if entry.stored_length != body_length:
        raise CorruptEntry(f"{path}: body length mismatch")
    if entry.sealed is not None:
        _open_sealed(entry, head, keyring)
    entry.file_size = size
    status = read_status(status_path if status_path is not None else path + STATUS_SUFFIX)
    if status is not None:
        apply_status(entry, status)
    return entry


def _open_sealed(entry: QueueEntry, head: bytes, keyring) -> None:
    if keyring is None:
        entry.body = FileBody(b"", entry.path, entry.body_length, opener=_NoKeyring(entry.qid))
        return
    opener = stream.Opener.open_header(keyring, head, entry.qid)
    try:
        sealed_trace = base64.b64decode(entry.sealed["trace"], validate=True)
    except ValueError:
        raise CorruptEntry(f"{entry.path}: bad sealed trace headers") from None
    entry.trace_headers = opener.open_extra(sealed_trace)
    entry.body = FileBody(entry.trace_headers, entry.path, entry.body_length, opener=opener)


class _NoKeyring:
    """The opener of a sealed entry read without the keys (listing only)."""

    def __init__(self, qid: str):
        self.qid = qid

    def segments(self, read, clear_length: int, limit=None):
        raise DecryptionError(
            f"queue file {self.qid} is encrypted ([queue] encrypt) and no keys were given"
        )


# -- status snapshots ----------------------------------------------------------


def encode_status(entry: QueueEntry, reason: str = "") -> bytes:
    """One status line: a full snapshot of per-recipient progress."""
    record = {
        "version": FORMAT_VERSION,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_error": entry.last_error,
        "states": [s.value for s in entry.states],
        "details": entry.details,
    }
    if reason:
        record["reason"] = reason
    return json.dumps(record, separators=(",", ":")).encode("ascii") + b"\n"


def read_status(path: str) -> dict | None:
    """The last complete snapshot in a status file, or None when there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(data.split(b"\n")):
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn append: fall back to the previous snapshot
        if isinstance(record, dict) and record.get("version") == FORMAT_VERSION:
            return record
    return None


def apply_status(entry: QueueEntry, status: dict) -> None:
    states = status.get("states", [])
    if len(states) != len(entry.envelope.recipients):
        return  # not this entry's snapshot: ignore rather than misattribute
    entry.states = [RecipientState(s) for s in states]
    entry.details = [str(d) for d in status.get("details", [""] * len(states))]
    entry.attempts = int(status.get("attempts", 0))
    entry.next_attempt = float(status.get("next_attempt", 0.0))
    entry.last_error = str(status.get("last_error", ""))
    entry.has_status = True
