"""The durable spool: receives message bodies and commits them into ``queue/active/``.

A 250 after DATA is only as good as this module: `SpoolFile.commit` fires after the
queue file (body + JSON metadata trailer, see `mta.queue.entry` for the format and
why it is one file) is written and fsynced in ``queue/tmp/``, renamed into
``queue/active/`` and the directory fsynced.  Throughput comes from *group commit*:
while one batch is in the thread pool, further commits queue up and go together as
the next batch (each file fsynced, all renamed, one directory fsync), so a busy
server pays one directory fsync and one thread hop per batch, not per message.
Status updates, deletions and dead-lettering join the same batches (after the
commits in them), so finishing a delivered message costs no thread hop of its own.

Bodies stay in memory up to 256 KB, then spill to ``queue/tmp/<qid>``, to which the
trailer is appended at commit (no copy).  The reactor thread never fsyncs.  With a
`keyring` (``[queue] encrypt``) every byte of a message that reaches the disk is
sealed (`mta.crypto.stream`): a spilled body segment by segment as it arrives, a
small one whole at commit, the trace headers inside the metadata; nothing in clear
is written, not even to ``tmp/``.

The spool announces each committed entry through ``spool.on_commit(entry)`` (set by
`mta.queue.filestore.FileQueueStore`, which owns the spool and schedules its
entries), so steady state needs no directory polling.  ``recover()`` scans the
directory once at startup (`mta.queue.recovery`): leftovers in ``tmp/`` were never
acknowledged and are deleted.  One process owns a queue directory.  Nothing outside
`mta.queue` uses this module.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mta.crypto.keys import Keyring, KeyringError
from mta.crypto.stream import Sealer
from mta.fileio import fsync_dir, write_all
from mta.interfaces import ISpool
from mta.observe.logging import Logger
from mta.process.batch import BatchWorker
from mta.queue import entry as fmt
from mta.queue import recovery
from mta.queue.body import FileBody
from mta.queue.entry import QueueEntry
from mta.queue.files import append_status, move_entry, reason_line, unlink_quietly
from mta.queue.ids import new_queue_id
from mta.queue.layout import ACTIVE, DEAD, FREE, HOLD, STATUS_SUFFIX, TMP
from mta.queue.spoolfile import OPEN_FLAGS, CommitJob, SpoolFile

log = Logger()

MEMORY_LIMIT = 256 * 1024
_RECYCLE_MAX_FILES = 1024
_RECYCLE_MAX_SIZE = 1024 * 1024


@implementer(ISpool)
class Spool:
    """The local queue directory.  See the module docstring."""

    def __init__(
        self,
        queue_dir: str,
        reactor,
        threadpool: ThreadPool,
        *,
        fsync: Callable[[int], None] = os.fsync,
        memory_limit: int = MEMORY_LIMIT,
        lanes: int = 2,
        keyring: Keyring | None = None,
    ):
        self.queue_dir = queue_dir
        self.reactor = reactor
        self.memory_limit = memory_limit
        self.keyring = keyring  # seal what is written (see the module docstring)
        self.on_commit: Callable[[QueueEntry], None] | None = None
        self.tmp_dir = os.path.join(queue_dir, TMP)
        self.active_dir = os.path.join(queue_dir, ACTIVE)
        self.dead_dir = os.path.join(queue_dir, DEAD)
        self.free_dir = os.path.join(queue_dir, FREE)
        self.hold_dir = os.path.join(queue_dir, HOLD)  # mta.queue.control: on hold
        for d in (self.tmp_dir, self.active_dir, self.dead_dir, self.free_dir, self.hold_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._fsync = fsync
        self._backlog = 0
        self._unannounced = 0
        # qids being received or committed: their tmp/ files are not leftovers.
        self._live: set[str] = set()
        self._scan_seen: set[str] | None = None
        # (name, size or 0 if unknown) of the files in free/: finished queue files kept
        # for reuse (see _recycle).  A deque because the commit and remove batches use
        # it from pool threads.
        self._free: collections.deque[tuple[str, int]] = collections.deque()
        # Everything that changes the queue directory shares one batch worker, so a
        # finished entry's removal rides along with the next commits instead of
        # costing a thread hop of its own.
        self._writer = BatchWorker(reactor, threadpool, self._write_batch, lanes)
        self._loader = BatchWorker(reactor, threadpool, self._load_batch)
        self._commit_batches = 0
        self._pool = threadpool

    # -- ISpool -------------------------------------------------------------------

    def new_queue_id(self) -> str:
        return new_queue_id()

    def open(self, queue_id: str) -> SpoolFile:
        self._live.add(queue_id)
        return SpoolFile(self, queue_id)

    def backlog(self) -> int:
        return self._backlog

    def adjust_backlog(self, delta: int) -> None:
        """Queue control moved entries into (+) or out of (-) ``active/``."""
        self._backlog += delta

    # -- paths --------------------------------------------------------------------

    def tmp_path(self, qid: str) -> str:
        return f"{self.tmp_dir}/{qid}"  # (not os.path.join: called per message)

    def active_path(self, qid: str) -> str:
        return f"{self.active_dir}/{qid}"

    @property
    def commit_batches(self) -> int:
        """How many group-commit batches ran (for tests and metrics)."""
        return self._commit_batches

    # -- commit -------------------------------------------------------------------

    def _commit(self, job: CommitJob) -> Deferred:
        d = self._writer.submit(("commit", job))
        d.addCallbacks(
            self._committed, self._commit_failed, callbackArgs=(job,), errbackArgs=(job,)
        )
        return d

    def _commit_failed(self, f: Failure, job: CommitJob) -> Failure:
        self._live.discard(job.qid)
        log.error(
            "commit of {qid} failed: {error}",
            qid=job.qid,
            error=f.getErrorMessage(),
            event="commit_failed",
        )
        return f

    def _committed(self, _, job: CommitJob) -> str:
        self._live.discard(job.qid)
        self._backlog += 1
        if self.on_commit is None:
            self._unannounced += 1
        if self._scan_seen is not None:
            self._scan_seen.add(job.qid)
        entry = QueueEntry(
            qid=job.qid,
            envelope=job.envelope,
            path=self.active_path(job.qid),
            body_length=job.length,
            trace_headers=job.trace_headers,
            created=job.created,
            file_size=job.file_size,
            sealed=job.sealed,
            body=FileBody(
                job.trace_headers,
                self.active_path(job.qid),
                job.length,
                job.chunks if job.in_memory else None,
                job.opener,
            ),
        )
        job.chunks = []
        log.info(
            "queued {qid} from {sender} to {count} recipient(s), {size} bytes",
            qid=job.qid,
            sender=str(job.envelope.sender) or "<>",
            count=len(job.envelope.recipients),
            size=job.length,
            event="queued",
        )
        if self.on_commit is not None:
            try:
                self.on_commit(entry)
            except Exception:
                log.failure("on_commit hook failed for {qid}", qid=job.qid)
        return job.qid

    def _write_batch(self, items: list[tuple[str, object]]) -> list:
        """Thread: one batch of queue-directory changes: commits first (their clients
        are waiting), then status records, then removals.  Results in item order."""
        groups: dict[str, list[tuple[int, object]]] = {"commit": [], "record": [], "remove": []}
        for i, (kind, payload) in enumerate(items):
            groups[kind].append((i, payload))
        results: list = [None] * len(items)
        if groups["commit"]:
            self._commit_batches += 1
        for kind, process in (
            ("commit", self._commit_batch),
            ("record", self._record_batch),
            ("remove", self._remove_batch),
        ):
            group = groups[kind]
            if group:
                for (i, _), result in zip(group, process([p for _, p in group])):
                    results[i] = result
        return results

    def _commit_batch(self, jobs: list[CommitJob]) -> list:
        """Thread: write + fsync each file, rename all, fsync the directory once."""
        results: list = []
        renamed: list[str] = []
        if self.keyring is not None:
            self._refresh_keys()
        for job in jobs:
            try:
                pieces, stored = self._body_pieces(job)
                meta = fmt.encode_metadata(
                    job.qid, job.envelope, job.trace_headers, job.length, job.created, job.sealed
                )
                trailer = fmt.encode_trailer(meta, stored)
                fd = job.fd
                reused = None if fd is not None else self._reuse(job.tmp_path)
                if reused is not None:
                    fd, old_size = reused
                elif fd is None:
                    fd = os.open(job.tmp_path, OPEN_FLAGS, 0o600)
                job.fd = None
                try:
                    write_all(fd, [*pieces, trailer])
                    size = stored + len(trailer)
                    if reused is not None and (old_size == 0 or old_size > size):
                        # A reused file longer than this message (or of unknown size).
                        os.ftruncate(fd, size)
                    if not job.in_memory:
                        job.chunks = []
                    job.file_size = size
                    self._fsync(fd)
                finally:
                    os.close(fd)
                final = self.active_path(job.qid)
                os.rename(job.tmp_path, final)
                renamed.append(final)
                results.append((True, job.qid))
            except Exception as e:
                _unlink_quietly(job.tmp_path)
                results.append((False, e))
        if renamed:
            try:
                self._fsync_dir(self.active_dir)
            except OSError as e:
                # Not durable, so not accepted: take the files back before saying 451.
                for path in renamed:
                    _unlink_quietly(path)
                results = [(False, e)] * len(jobs)
        return results

    def _body_pieces(self, job: CommitJob) -> tuple[list[bytes], int]:
        """Thread: what is left to write of `job`'s body, and the body region's size.
        Sealing makes the entry's metadata and opener too."""
        if self.keyring is None:
            return job.chunks, job.length
        sealer = job.sealer
        if job.in_memory:
            sealer = Sealer(self.keyring, job.qid)
            pieces = sealer.seal_all(job.chunks)
        elif job.chunks or not sealer.closed:
            pieces = [*sealer.feed(job.chunks), sealer.close()]
        else:
            pieces = []  # body() sealed the end already
        job.sealed = fmt.seal_fields(sealer, job.length, job.trace_headers)
        job.opener = sealer.opener()
        job.sealer = None
        return pieces, job.sealed["stored_length"]

    def _refresh_keys(self) -> None:
        """Follow `mta-admin key rotate`; broken key files leave the loaded keys in use."""
        try:
            self.keyring.refresh()
        except KeyringError as e:
            log.warn("cannot re-read the queue's keys: {error}", error=str(e))

    def _reuse(self, tmp_path: str) -> tuple[int, int] | None:
        """Thread: (fd, size) for `tmp_path` made from a recycled file of that size (0
        when unknown), or None when there is none.

        Creating and deleting a file per message is what an ext4 file system
        without a journal handles worst: every inode allocation scans past the
        recently deleted ones (`recently_deleted()` in the kernel), which cost more
        CPU than everything else in a message's life.  Renaming a finished queue file
        into free/ and overwriting it for the next message allocates no inode and,
        for a message no larger than the last, no blocks either."""
        while True:
            try:
                name, size = self._free.pop()
            except IndexError:
                return None
            try:
                os.rename(f"{self.free_dir}/{name}", tmp_path)
                return os.open(tmp_path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)), size
            except OSError:
                continue

    def _recycle(self, path: str, qid: str, length: int, size: int) -> None:
        """Thread: retire a finished queue file (`size` bytes, 0 if unknown) into
        free/, or delete it."""
        if length <= _RECYCLE_MAX_SIZE and len(self._free) < _RECYCLE_MAX_FILES:
            try:
                os.rename(path, f"{self.free_dir}/{qid}")
            except FileNotFoundError:
                return
            self._free.append((qid, size))
        else:
            _unlink_quietly(path)

    def _fsync_dir(self, path: str) -> None:
        fsync_dir(path, self._fsync)

    # -- status, finish, dead letters (used by the runner) --------------------------

    def record(self, entry: QueueEntry) -> Deferred:
        """Durably append a status snapshot for an entry with unfinished recipients."""
        entry.has_status = True
        return self._writer.submit(("record", (entry.qid, fmt.encode_status(entry))))

    def _record_batch(self, items: list) -> list:
        results: list = []
        created = False
        for qid, line in items:
            try:
                created |= append_status(self.active_path(qid) + STATUS_SUFFIX, line, self._fsync)
                results.append((True, None))
            except Exception as e:
                results.append((False, e))
        if created:
            self._fsync_dir(self.active_dir)
        return results

    def finish(self, entry: QueueEntry) -> Deferred:
        """Delete an entry whose recipients are all delivered."""
        self._backlog -= 1
        entry.body.forget_memory()
        return self._writer.submit(
            (
                "remove",
                ("finish", entry.qid, (entry.body_length, entry.file_size, entry.has_status)),
            )
        )

    def bury(self, entry: QueueEntry, reason: str) -> Deferred:
        """Move an entry with permanently failed recipients to ``queue/dead/``."""
        self._backlog -= 1
        entry.body.forget_memory()
        return self._writer.submit(
            ("remove", ("bury", entry.qid, fmt.encode_status(entry, reason)))
        )

    def _remove_batch(self, items: list) -> list:
        results: list = []
        buried = False
        for action, qid, line in items:
            path = self.active_path(qid)
            try:
                if action == "finish":
                    length, size, has_status = line
                    if has_status:
                        _unlink_quietly(path + STATUS_SUFFIX)
                    self._recycle(path, qid, length, size)
                else:
                    move_entry(
                        self.queue_dir,
                        qid,
                        ACTIVE,
                        DEAD,
                        status_line=line,
                        fsync=self._fsync,
                        sync_dirs=False,
                    )
                    buried = True
                results.append((True, None))
            except Exception as e:
                results.append((False, e))
        if buried:
            self._fsync_dir(self.dead_dir)
            self._fsync_dir(self.active_dir)
        # A finished entry needs no directory fsync: if its removal is lost in a
        # crash, recovery finds it again and the store's has_delivered check
        # keeps it from being delivered twice.
        return results

    # -- loading and recovery -------------------------------------------------------

    def load(self, qid: str) -> Deferred:
        """Deferred with the entry from disk, or None when it is gone or corrupt
        (a corrupt file is moved to ``dead/`` with the reason)."""
        return self._loader.submit(qid).addCallback(self._loaded)

    def _loaded(self, entry: QueueEntry | None) -> QueueEntry | None:
        if entry is None:
            self._backlog -= 1  # deleted behind our back, or moved to dead/ as corrupt
        return entry

    def _load_batch(self, qids: list[str]) -> list:
        results: list = []
        for qid in qids:
            path = self.active_path(qid)
            try:
                results.append((True, fmt.read_entry(path, keyring=self.keyring)))
            except FileNotFoundError:
                results.append((True, None))
            except fmt.CorruptEntry as e:
                log.error(
                    "corrupt queue file {qid}: {reason}", qid=qid, reason=str(e), event="corrupt"
                )
                try:
                    move_entry(
                        self.queue_dir,
                        qid,
                        ACTIVE,
                        DEAD,
                        status_line=reason_line(f"corrupt: {e}"),
                        fsync=self._fsync,
                    )
                except OSError:
                    pass
                results.append((True, None))
            except Exception as e:
                results.append((False, e))
        return results

    def recover(self) -> Deferred:
        """Scan once at startup.  Deferred with [(next_attempt, qid)] for every entry
        in ``active/``, oldest first; the backlog count includes them."""
        self._scan_seen = set()
        d = deferToThreadPool(self.reactor, self._pool, self._scan, self._live)

        def done(found):
            seen, self._scan_seen = self._scan_seen or set(), None
            found = [(due, qid) for due, qid in found if qid not in seen]
            self._backlog += len(found) - self._unannounced
            self._unannounced = 0
            return found

        def failed(f):
            self._scan_seen = None
            return f

        return d.addCallbacks(done, failed)

    def _scan(self, live: set[str]) -> list[tuple[float, str]]:
        # `live` is read (membership only) while the reactor updates it: a qid leaves
        # it only after its file was renamed out of tmp/ or deleted.
        return recovery.scan(self.queue_dir, live, self._free, _RECYCLE_MAX_FILES)

    def wait_idle(self) -> Deferred:
        """Fires when no spool batch is running (for an orderly shutdown)."""
        return gatherResults([w.wait_idle() for w in (self._writer, self._loader)])


_unlink_quietly = unlink_quietly
