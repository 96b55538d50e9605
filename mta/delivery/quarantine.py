"""Quarantine: where a message a policy check held goes instead of its recipients.

The router sends every recipient of a job whose `Envelope.quarantine` is set to the
`QuarantineAgent`, which keeps the message ONCE (not per recipient) as
``<datadir>/quarantine/<qid>.eml`` (the message as it would have been delivered:
trace headers, then the body) next to a JSON sidecar ``<qid>.json`` (envelope,
recipients, reasons, time), and answers DELIVERED for every recipient: the queue's
work is done, the operator decides (`mta-admin quarantine list|show|release|delete`).

Both files are written durably on a thread pool, as the mail stores do: a ``tmp.*.part``
file, fsync, rename, and one fsync of the directory; the sidecar is renamed last, so
a message is listed only once its body is in place.  Writing the same queue id again
(a retry after a crash) replaces the files with identical content.

With encryption at rest on (``[storage] encrypt`` or ``[queue] encrypt``) the
message file is sealed like a queued message (`mta.crypto.stream`, bound to the
quarantine id) and the sidecar records its clear size (``sealed_size``); the sidecar
itself (envelope and reasons) stays readable, so `quarantine list` needs no key.

The blocking helpers at the bottom (`list_quarantine`, `read_record`, `read_message`,
`delete_quarantined`) are what `mta-admin` uses.
"""

from __future__ import annotations

import json
import os
import re

import attrs
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from mta.crypto import stream
from mta.crypto.keys import DecryptionError
from mta.envelope import (
    DeliveryResult,
    Envelope,
    RecipientState,
    Reply,
    envelope_fields,
    envelope_from_fields,
)
from mta.fileio import fsync_dir, write_all
from mta.interfaces import IDeliveryAgent
from mta.observe.logging import Logger

log = Logger()

FORMAT_VERSION = 1
QUARANTINED = Reply(250, "2.0.0", "quarantined")
_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}\Z")
_CHUNK = 1 << 20


class NotQuarantined(KeyError):
    """No message with that id in the quarantine."""

    def __str__(self) -> str:
        return f"{self.args[0]}: no such message in the quarantine"


def is_quarantine_id(qid: str) -> bool:
    return bool(_ID_RE.match(qid))


def envelope_record(qid: str, envelope: Envelope, recipients, now: float) -> dict:
    """The sidecar's content: enough to show the message and to release it (the
    envelope as the queue stores it, for the quarantined `recipients`, with their
    original recipients and DSN request, so a release delivers and notifies as the
    message would have been without the quarantine)."""
    fields = envelope_fields(envelope)
    fields.pop("quarantine", None)
    index = {r: i for i, r in enumerate(envelope.recipients)}

    def for_these(values: list) -> list:
        # Per-recipient lists, parallel to every recipient: keep these recipients' own.
        if len(values) != len(envelope.recipients):
            return []
        return [values[index[r]] for r in recipients]

    fields["recipients"] = [[r.local, r.domain] for r in recipients]
    fields["original_recipients"] = for_these(fields["original_recipients"])
    if "dsn" in fields:
        dsn = fields["dsn"]
        dsn["notify"], dsn["orcpt"] = for_these(dsn["notify"]), for_these(dsn["orcpt"])
    return {
        "version": FORMAT_VERSION,
        "qid": qid,
        "quarantined_at": now,
        "reasons": [r for r in (envelope.quarantine or "").split("; ") if r],
        **fields,
    }


def record_envelope(record: dict) -> Envelope:
    """The envelope of a quarantined message (quarantine cleared), from its sidecar."""
    envelope = envelope_from_fields({**record, "quarantine": None})
    if len(envelope.original_recipients) != len(envelope.recipients):
        envelope = attrs.evolve(envelope, original_recipients=())
    return envelope


@implementer(IDeliveryAgent)
class QuarantineAgent:
    """Keeps quarantined messages under `directory` (``<datadir>/quarantine``),
    writing on `threadpool`; `clock` gives the time recorded in the sidecar."""

    def __init__(self, directory: str, threadpool, reactor, *, fsync=os.fsync, keyring=None):
        self.directory = directory
        self._pool = threadpool
        self._reactor = reactor
        self._fsync = fsync
        self._keyring = keyring  # seal the message files (encryption at rest)

    def deliver(self, job, recipients):
        recipients = list(recipients)
        now = self._reactor.seconds()
        record = envelope_record(job.qid, job.envelope, recipients, now)
        d = deferToThreadPool(self._reactor, self._pool, self._store, job, record)
        return d.addCallback(self._results, job, recipients)

    def _results(self, _, job, recipients) -> list[DeliveryResult]:
        reason = job.envelope.quarantine or "policy"
        log.info(
            "{qid} quarantined: {reason}",
            event="quarantined",
            qid=job.qid,
            reason=reason,
            recipients=len(recipients),
        )
        detail = f"quarantined: {reason}"
        return [
            DeliveryResult(r, RecipientState.DELIVERED, detail, QUARANTINED) for r in recipients
        ]

    def _store(self, job, record: dict) -> None:
        """Thread: message then sidecar, each tmp + fsync + rename; the directory once."""
        if not is_quarantine_id(job.qid):
            raise ValueError(f"{job.qid!r} cannot name a quarantined message")
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        base = os.path.join(self.directory, job.qid)
        chunks = job.body.chunks(_CHUNK)
        if self._keyring is not None:
            chunks = stream.seal_stream(stream.Sealer(self._keyring, job.qid), chunks)
            record = {**record, "sealed_size": job.body.size}
        self._write(base + ".eml", chunks)
        data = json.dumps(record, sort_keys=True, ensure_ascii=True).encode("ascii") + b"\n"
        self._write(base + ".json", [data])
        fsync_dir(self.directory, self._fsync)

    def _write(self, path: str, chunks) -> None:
        tmp = f"{os.path.dirname(path)}/tmp.{os.getpid()}.{os.path.basename(path)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                for chunk in chunks:
                    write_all(fd, [chunk])
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
            self._fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- blocking helpers for mta-admin ------------------------------------------------


def _path(directory: str, qid: str, suffix: str) -> str:
    if not is_quarantine_id(qid):
        raise NotQuarantined(qid)
    return os.path.join(directory, qid + suffix)


def read_record(directory: str, qid: str) -> dict:
    """The sidecar of `qid`; NotQuarantined when there is none."""
    try:
        with open(_path(directory, qid, ".json"), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise NotQuarantined(qid) from None


def read_message(directory: str, qid: str, keyring=None) -> bytes:
    """The quarantined message as it would have been delivered (a sealed one is
    decrypted with `keyring`; DecryptionError without the right one)."""
    path = _path(directory, qid, ".eml")
    try:
        sealed_size = read_record(directory, qid).get("sealed_size")
        if sealed_size is not None:
            if keyring is None:
                raise DecryptionError(
                    f"quarantined message {qid} is encrypted and encryption at rest is off"
                    " in this configuration"
                )
            return stream.read_sealed_file(keyring, path, qid, int(sealed_size))
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise NotQuarantined(qid) from None


def list_quarantine(directory: str) -> list[dict]:
    """Every sidecar, oldest first (unreadable ones are skipped)."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("tmp.") or not name.endswith(".json"):  # (tmp.* end in .part)
            continue
        try:
            out.append(read_record(directory, name[:-5]))
        except (NotQuarantined, ValueError):
            continue
    out.sort(key=lambda r: (r.get("quarantined_at", 0.0), r.get("qid", "")))
    return out


def delete_quarantined(directory: str, qid: str, fsync=os.fsync) -> None:
    """Remove `qid` (sidecar first, so a half-deleted message is never listed)."""
    sidecar = _path(directory, qid, ".json")
    if not os.path.exists(sidecar):
        raise NotQuarantined(qid)
    _unlink(sidecar)
    _unlink(_path(directory, qid, ".eml"))
    fsync_dir(directory, fsync)
