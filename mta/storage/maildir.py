"""Maildir mail store: ``<mail_root>/<domain>/<local>/{tmp,new,cur}``.

Each delivery is the Maildir dance, made durable: write the prefix and copy the
queued body (copy_file_range/sendfile for big bodies, one pread+writev for small
ones, so memory stays bounded) into ``tmp/<name>``, fsync, rename into ``new/``,
fsync ``new/``.  `deliver_batch` does many deliveries in one call and fsyncs each
distinct ``new/`` only once, which is where local delivery gets its throughput.

File names follow the Maildir spec, ``<sec>.M<usec>P<pid>Q<tag>.<host>,S=<size>``,
and embed the caller's `message_tag` (unique per queue id and recipient), so after a
crash between the rename and the queue's status record `has_delivered` finds the
message and it is not delivered twice.

Domain and local part become path components, so they are validated: no ``/``, NUL
or control characters, not empty, no leading ``.`` (which also refuses ``.``/``..``).
Every method blocks; callers run them on a thread pool.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Sequence

from zope.interface import implementer

from mta.fileio import fsync_dir, make_dirs_durably, probe_writable
from mta.interfaces import IMailStore
from mta.storage.items import StoredMessage, StoreItem
from mta.storage.names import UnsafeMailboxName, mailbox_location
from mta.storage.onefile import OneFilePerMessage

__all__ = ["MaildirStore", "UnsafeMailboxName"]

_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_TAG_IN_NAME = re.compile(r"Q([A-Za-z0-9_-]+)\.")  # what _write_one puts in a name
_ARRIVAL = re.compile(r"(\d+)\.M(\d+)")


def _arrival(message_id: str) -> tuple:
    """Sort key among messages with one mtime: the name's seconds and microseconds as
    numbers (they are not zero-padded, so as text M99999 sorts after M100000)."""
    name = message_id.partition("/")[2]
    m = _ARRIVAL.match(name)
    return (int(m.group(1)), int(m.group(2)), name) if m else (0, 0, name)


def _tags_in(box: str) -> dict[str, str]:
    """{message tag: its file} of every message in `box` (one listing)."""
    found: dict[str, str] = {}
    for sub in ("new", "cur"):
        try:
            names = os.listdir(f"{box}/{sub}")
        except FileNotFoundError:
            continue
        search = _TAG_IN_NAME.search
        for name in names:
            m = search(name)
            if m is not None:
                found.setdefault(m.group(1), f"{box}/{sub}/{name}")
    return found


_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _maildir_host(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


@implementer(IMailStore)
class MaildirStore(OneFilePerMessage):
    """Maildir under `mail_root`.  `fsync` is injectable for tests."""

    def __init__(
        self,
        mail_root: str,
        hostname: str | None = None,
        *,
        fsync: Callable[[int], None] = os.fsync,
    ):
        self.mail_root = mail_root
        self._host = _maildir_host(hostname or socket.gethostname())
        self._fsync = fsync
        self._known: set[str] = set()
        self._paths: dict = {}  # mailbox -> its directory (names checked once)

    # -- paths ----------------------------------------------------------------------

    def mailbox_path(self, mailbox) -> str:
        """The Maildir directory of `mailbox`; raises UnsafeMailboxName."""
        path = self._paths.get(mailbox)
        if path is None:
            path = mailbox_location(self.mail_root, mailbox)
            if len(self._paths) >= 10000:
                self._paths.clear()
            self._paths[mailbox] = path
        return path

    def ensure_mailbox(self, mailbox) -> None:
        self._ensure(self.mailbox_path(mailbox))

    def _ensure(self, box: str) -> None:
        if box in self._known:
            return
        if not os.path.isdir(os.path.join(box, "new")):
            make_dirs_durably(box, self._fsync, ("tmp", "new", "cur"))
        self._known.add(box)

    def _fsync_dir(self, path: str) -> None:
        fsync_dir(path, self._fsync)

    # -- IMailStore -----------------------------------------------------------------

    name = "maildir"

    def create_mailbox(self, mailbox) -> str:
        box = self.mailbox_path(mailbox)
        self._ensure(box)
        return box

    def remove_mailbox(self, mailbox) -> bool:
        box = self.mailbox_path(mailbox)
        self._known.discard(box)
        if not os.path.isdir(box):
            return False
        shutil.rmtree(box)
        self._fsync_dir(os.path.dirname(box))
        return True

    def probe(self) -> str:
        """The store's root takes a new file (created, written, removed)."""
        return probe_writable(self.mail_root)

    def list_messages(self, mailbox) -> list[StoredMessage]:
        box = self.mailbox_path(mailbox)
        out = []
        for sub in ("new", "cur"):
            try:
                with os.scandir(f"{box}/{sub}") as it:
                    for e in it:
                        if e.name.startswith("."):
                            continue
                        st = e.stat()
                        out.append(
                            StoredMessage(f"{sub}/{e.name}", st.st_size, st.st_mtime, "INBOX")
                        )
            except FileNotFoundError:
                continue
        out.sort(key=lambda m: (m.received, _arrival(m.message_id)))
        return out

    def _message_path(self, mailbox, message_id: str) -> str:
        sub, _, name = message_id.partition("/")
        if sub not in ("new", "cur") or not name or "/" in name or name.startswith("."):
            raise KeyError(message_id)
        return f"{self.mailbox_path(mailbox)}/{sub}/{name}"

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return message_tag in _tags_in(self.mailbox_path(mailbox))

    def delivered_tags(self, mailbox) -> frozenset[str]:
        """Every message tag in `mailbox`, from one listing of ``new/`` and ``cur/``.

        Finding one tag means listing the mailbox (its time-stamped names cannot be
        looked up): a retried batch asks this once per mailbox instead of once per
        message, which made draining a backlog into a large mailbox quadratic."""
        return frozenset(_tags_in(self.mailbox_path(mailbox)))

    # -- batches --------------------------------------------------------------------

    def deliver_batch(self, items: Sequence[StoreItem]) -> list:
        """Deliver each item; one fsync per distinct ``new/``.  Returns, per item, the
        stored path or the exception that stopped it (never raises for one item)."""
        results: list = [None] * len(items)
        dirs: dict[str, list[int]] = {}
        present: dict[str, dict[str, str]] = {}  # box -> its tags, listed once a batch
        for i, item in enumerate(items):
            try:
                box = self.mailbox_path(item.mailbox)
                if not _TAG_RE.match(item.message_tag):
                    raise ValueError(f"bad message tag {item.message_tag!r}")
                if item.check_existing:
                    if box not in present:
                        present[box] = _tags_in(box)
                    found = present[box].get(item.message_tag)
                    if found is not None:
                        results[i] = found
                        continue
                results[i] = self._write_one(box, item)
                dirs.setdefault(f"{box}/new", []).append(i)
            except Exception as e:
                results[i] = e
        for new_dir, indexes in dirs.items():
            try:
                self._fsync_dir(new_dir)
            except OSError as e:
                for i in indexes:
                    results[i] = e
        return results

    def _write_one(self, box: str, item: StoreItem) -> str:
        self._ensure(box)
        size = item.size
        while True:
            now = time.time()
            sec = int(now)
            name = f"{sec}.M{int((now - sec) * 1e6)}P{_pid}Q{item.message_tag}.{self._host}"
            tmp = f"{box}/tmp/{name}"  # (not os.path.join: called per message)
            try:
                fd = os.open(tmp, _OPEN_FLAGS, 0o600)
                break
            except FileExistsError:
                continue
            except FileNotFoundError:
                self._known.discard(box)  # mailbox removed behind our back: recreate
                self._ensure(box)
                fd = os.open(tmp, _OPEN_FLAGS, 0o600)
                break
        try:
            try:
                if item.body.copy_into(fd, item.prefix) != size:
                    raise OSError(errno.EIO, "message body is not as long as recorded")
                self._fsync(fd)
            finally:
                os.close(fd)
            final = f"{box}/new/{name},S={size}"
            os.rename(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return final
