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
import socket
import time
from collections.abc import Callable, Sequence

import attrs
from zope.interface import implementer

from mta.fileio import fsync_dir, write_all
from mta.interfaces import IMailStore
from mta.storage.names import UnsafeMailboxName
from mta.storage.names import safe_component as _safe_component

_SMALL = 256 * 1024
_COPY_CHUNK = 1024 * 1024
_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


@attrs.frozen
class DeliveryItem:
    """One message for one mailbox, for `MaildirStore.deliver_batch`."""

    mailbox: object  # an Address
    message_tag: str
    prefix: bytes
    source_path: str
    length: int
    check_existing: bool = False
    # The body bytes, when the caller still holds them: written as they are instead of
    # being read from `source_path` (which holds the same `length` bytes).
    body: Sequence[bytes] | None = None


def _maildir_host(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


@implementer(IMailStore)
class MaildirStore:
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

    # -- paths ----------------------------------------------------------------------

    def mailbox_path(self, mailbox) -> str:
        """The Maildir directory of `mailbox`; raises UnsafeMailboxName."""
        domain = _safe_component(mailbox.domain, "domain")
        local = _safe_component(mailbox.local, "local part")
        return os.path.join(self.mail_root, domain, local)

    def ensure_mailbox(self, mailbox) -> None:
        self._ensure(self.mailbox_path(mailbox))

    def _ensure(self, box: str) -> None:
        if box in self._known:
            return
        if not os.path.isdir(os.path.join(box, "new")):
            created = []
            path = box
            while not os.path.isdir(path):
                created.append(path)
                path = os.path.dirname(path)
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(box, sub), mode=0o700, exist_ok=True)
            # Make the new directories durable: fsync each and the parent it was made in.
            for d in [box, *created, path]:
                self._fsync_dir(d)
        self._known.add(box)

    def _fsync_dir(self, path: str) -> None:
        fsync_dir(path, self._fsync)

    # -- IMailStore -----------------------------------------------------------------

    def deliver(
        self, mailbox, message_tag: str, prefix: bytes, source_path: str, length: int
    ) -> str:
        result = self.deliver_batch(
            [DeliveryItem(mailbox, message_tag, prefix, source_path, length)]
        )[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self._find(self.mailbox_path(mailbox), message_tag) is not None

    def _find(self, box: str, message_tag: str) -> str | None:
        marker = f"Q{message_tag}."
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(box, sub)) as it:
                    for e in it:
                        if marker in e.name:
                            return e.path
            except FileNotFoundError:
                continue
        return None

    # -- batches --------------------------------------------------------------------

    def deliver_batch(self, items: Sequence[DeliveryItem]) -> list:
        """Deliver each item; one fsync per distinct ``new/``.  Returns, per item, the
        stored path or the exception that stopped it (never raises for one item)."""
        results: list = [None] * len(items)
        dirs: dict[str, list[int]] = {}
        sources: dict[str, int] = {}
        try:
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
                    src = None
                    if item.body is None:
                        src = sources.get(item.source_path)
                        if src is None:
                            src = sources[item.source_path] = os.open(
                                item.source_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
                            )
                    results[i] = self._write_one(box, item, src)
                    dirs.setdefault(f"{box}/new", []).append(i)
                except Exception as e:
                    results[i] = e
        finally:
            for fd in sources.values():
                os.close(fd)
        for new_dir, indexes in dirs.items():
            try:
                self._fsync_dir(new_dir)
            except OSError as e:
                for i in indexes:
                    results[i] = e
        return results

    def _write_one(self, box: str, item: DeliveryItem, src: int | None) -> str:
        self._ensure(box)
        size = len(item.prefix) + item.length
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
                if src is None:
                    if write_all(fd, [item.prefix, *item.body]) != size:
                        raise OSError(errno.EIO, "message body is not as long as recorded")
                else:
                    _copy(fd, src, item.prefix, item.length)
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


def _copy(dst: int, src: int, prefix: bytes, length: int) -> None:
    """Write `prefix` then bytes [0, length) of `src` into `dst`, in bounded memory."""
    if length <= _SMALL:
        data = os.pread(src, length, 0)
        if len(data) != length:
            raise OSError(errno.EIO, "queued message is shorter than recorded")
        write_all(dst, [prefix, data])
        return
    write_all(dst, [prefix])
    offset = 0
    fast = True
    while offset < length:
        count = min(_COPY_CHUNK * 8, length - offset)
        n = 0
        if fast:
            try:
                if hasattr(os, "copy_file_range"):
                    n = os.copy_file_range(src, dst, count, offset)
                else:
                    n = os.sendfile(dst, src, offset, count)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                fast = False
                continue
        else:
            data = os.pread(src, min(_COPY_CHUNK, count), offset)
            n = len(data)
            if n:
                write_all(dst, [data])
        if n == 0:
            raise OSError(errno.EIO, "queued message is shorter than recorded")
        offset += n
