"""Time-series archive store: one file per message, filed by the UTC day it came.

``<archive_root>/<domain>/<local>/YYYY/MM/DD/<unique>.eml``, written the Maildir
way: the prefix and the body are copied into ``<mailbox>/tmp/<unique>``, fsynced,
linked into the day directory (a link never replaces a file of the same name), and that directory is fsynced (new directories are
made durable by fsyncing each one and its parent).  A delivery killed midway leaves
at most a file in ``tmp/``, which nothing lists.

Unique names are ``<sec>.M<usec>P<pid>Q<message_tag>.eml``.  `has_delivered` only
runs for retries and recovery, and a message tag can only have been stored while
its message was in the queue, so it looks in the day directories of the last
`lookback_days` (the queue's maximum age plus slack, from `open_store`), newest
first, never through the whole archive.
Every method blocks; callers run them on a thread pool.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence

from zope.interface import implementer

from mta.fileio import fsync_dir, make_dirs_durably, probe_writable
from mta.interfaces import IMailStore
from mta.storage.items import StoredMessage, StoreItem
from mta.storage.names import mailbox_location
from mta.storage.onefile import OneFilePerMessage

__all__ = ["ArchiveStore"]

_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_ID_RE = re.compile(r"(\d{4})/(\d{2})/(\d{2})/([^./][^/]*\.eml)\Z")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_DAY = 86400


@implementer(IMailStore)
class ArchiveStore(OneFilePerMessage):
    """Day-filed message files under `archive_root`.  `fsync` and `clock` are
    injectable for tests."""

    name = "timeseries"

    def __init__(
        self,
        archive_root: str,
        *,
        fsync: Callable[[int], None] = os.fsync,
        clock: Callable[[], float] = time.time,
        lookback_days: int = 8,
    ):
        self.archive_root = archive_root
        self._fsync = fsync
        self._clock = clock
        self.lookback_days = lookback_days
        self._known: set[str] = set()

    # -- paths ---------------------------------------------------------------------

    def mailbox_path(self, mailbox) -> str:
        """The archive directory of `mailbox`; raises UnsafeMailboxName."""
        return mailbox_location(self.archive_root, mailbox)

    def _ensure(self, directory: str) -> None:
        """Make `directory` (and its parents) exist durably."""
        if directory in self._known:
            return
        make_dirs_durably(directory, self._fsync)
        if len(self._known) > 10000:
            self._known.clear()
        self._known.add(directory)

    def _days(self, box: str) -> list[str]:
        """Every ``YYYY/MM/DD`` of `box`, oldest first."""
        days = []
        for y in _numbered(box, 4):
            for m in _numbered(f"{box}/{y}", 2):
                days.extend(f"{y}/{m}/{d}" for d in _numbered(f"{box}/{y}/{m}", 2))
        return days

    # -- IMailStore ----------------------------------------------------------------

    def create_mailbox(self, mailbox) -> str:
        box = self.mailbox_path(mailbox)
        self._ensure(f"{box}/tmp")
        return box

    def remove_mailbox(self, mailbox) -> bool:
        box = self.mailbox_path(mailbox)
        self._known = {d for d in self._known if d != box and not d.startswith(box + "/")}
        if not os.path.isdir(box):
            return False
        shutil.rmtree(box)
        fsync_dir(os.path.dirname(box), self._fsync)
        return True

    def probe(self) -> str:
        """The store's root takes a new file (created, written, removed)."""
        return probe_writable(self.archive_root)

    def list_messages(self, mailbox) -> list[StoredMessage]:
        box = self.mailbox_path(mailbox)
        out = []
        for day in self._days(box):
            with os.scandir(f"{box}/{day}") as it:
                for e in it:
                    if e.name.startswith(".") or not e.name.endswith(".eml"):
                        continue
                    st = e.stat()
                    out.append(StoredMessage(f"{day}/{e.name}", st.st_size, st.st_mtime))
        out.sort(key=lambda m: (m.message_id[:10], m.received, m.message_id))
        return out

    def _message_path(self, mailbox, message_id: str) -> str:
        if not _ID_RE.match(message_id):
            raise KeyError(message_id)
        return f"{self.mailbox_path(mailbox)}/{message_id}"

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self._find(self.mailbox_path(mailbox), message_tag) is not None

    def _find(self, box: str, message_tag: str) -> str | None:
        marker = f"Q{message_tag}.eml"
        now = self._clock()
        for back in range(-1, self.lookback_days + 1):  # -1: tomorrow (clock skew)
            day = time.strftime("%Y/%m/%d", time.gmtime(now - back * _DAY))
            try:
                with os.scandir(f"{box}/{day}") as it:
                    for e in it:
                        if e.name.endswith(marker):
                            return e.path
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    # -- delivery ------------------------------------------------------------------

    def deliver_batch(self, items: Sequence[StoreItem]) -> list:
        """Deliver each item; one fsync per distinct day directory."""
        results: list = [None] * len(items)
        dirs: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            try:
                box = self.mailbox_path(item.mailbox)
                if not _TAG_RE.match(item.message_tag):
                    raise ValueError(f"bad message tag {item.message_tag!r}")
                if item.check_existing:
                    found = self._find(box, item.message_tag)
                    if found is not None:
                        results[i] = found
                        continue
                results[i] = self._write_one(box, item)
                dirs.setdefault(os.path.dirname(results[i]), []).append(i)
            except Exception as e:
                results[i] = e
        for day_dir, indexes in dirs.items():
            try:
                fsync_dir(day_dir, self._fsync)
            except OSError as e:
                for i in indexes:
                    results[i] = e
        return results

    def _write_one(self, box: str, item: StoreItem) -> str:
        self._ensure(f"{box}/tmp")
        pid = os.getpid()
        attempt = 0
        while True:
            now = self._clock()
            sec = int(now)
            usec = f"{int((now - sec) * 1e6):06d}" + (f"_{attempt}" if attempt else "")
            name = f"{sec}.M{usec}P{pid}Q{item.message_tag}.eml"
            tmp = f"{box}/tmp/{name}"
            try:
                fd = os.open(tmp, _OPEN_FLAGS, 0o600)
                break
            except FileExistsError:
                attempt += 1
            except FileNotFoundError:  # mailbox removed behind our back: recreate
                self._known.discard(f"{box}/tmp")
                self._ensure(f"{box}/tmp")
                fd = os.open(tmp, _OPEN_FLAGS, 0o600)
                break
        try:
            try:
                if item.body.copy_into(fd, item.prefix) != item.size:
                    raise OSError(errno.EIO, "message body is not as long as recorded")
                self._fsync(fd)
            finally:
                os.close(fd)
            day_dir = f"{box}/{time.strftime('%Y/%m/%d', time.gmtime(now))}"
            self._ensure(day_dir)
            final = f"{day_dir}/{name}"
            while True:  # link, not rename: never replace a message of the same name
                try:
                    os.link(tmp, final)
                    break
                except FileExistsError:
                    attempt += 1
                    final = f"{day_dir}/{name.replace('P', f'_{attempt}P', 1)}"
            os.unlink(tmp)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return final


def _numbered(path: str, width: int) -> list[str]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if len(n) == width and n.isdigit())
