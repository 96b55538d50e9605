"""mbox mail store: one file per mailbox, ``<mail_root>/<domain>/<local>.mbox``.

The format is mboxrd, as mutt, Thunderbird and Python's `mailbox.mbox` read it:
each message starts with ``From <sender> <asctime date in UTC>`` (the sender from
the ``Return-Path`` the delivery prefix carries, ``MAILER-DAEMON`` for the null
sender), its lines end in LF (CRLF is converted: the norm of the format), every
line matching ``>*From `` gets one more ``>`` on write and loses it on read, and an
empty line follows each message.  Reading a message back therefore gives the
delivered bytes with LF line endings, not byte for byte.

The file is locked the way mail readers lock it (`mta.storage.locking`: a
``<file>.lock`` dotlock and ``fcntl.lockf``) for every read and write.  An append
is crash safe: before writing, the old sizes of the mbox and of its tag index go
into ``<file>.appending`` (fsynced); after the mbox and the index are fsynced that
sidecar is removed.  Whoever next locks the mailbox and finds the sidecar truncates
both files back, so a delivery killed midway never leaves half a message visible.

`message_tag`s live in ``<file>.tags`` (one per line, appended after the message is
durable), which is what `has_delivered` reads.  Message ids are stable: a hash of
the message as stored (From line included), with ``-2``, ``-3``... for copies.
Every method blocks; callers run them on a thread pool.
"""

from __future__ import annotations

import calendar
import errno
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence

from zope.interface import implementer

from mta.fileio import fsync_dir, make_dirs_durably, probe_writable, write_all
from mta.interfaces import IMailStore
from mta.storage.items import StoredMessage, StoreItem
from mta.storage.locking import MailboxLock
from mta.storage.names import mailbox_location

__all__ = ["MboxStore", "escape_lines", "sender_of"]

_QUOTE_RE = re.compile(rb"^(>*From )", re.M)
_UNQUOTE_RE = re.compile(rb"^>(>*From )", re.M)
_RETURN_PATH_RE = re.compile(rb"(?im)^Return-Path:[ \t]*<?([^<>\r\n]*)>?[ \t]*\r?$")
_SEPARATOR_RE = re.compile(rb"^From ", re.M)
_TAG_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


def sender_of(prefix: bytes, header_block: bytes = b"") -> str:
    """The envelope sender for the From line: the first Return-Path, else
    MAILER-DAEMON (also for the null sender ``<>``)."""
    for text in (prefix, header_block):
        match = _RETURN_PATH_RE.search(text)
        if match:
            sender = match.group(1).strip().decode("utf-8", "replace")
            sender = "".join(sender.split())  # never a space inside the From line
            return sender or "MAILER-DAEMON"
    return "MAILER-DAEMON"


def escape_lines(chunks: Iterable[bytes]) -> Iterable[bytes]:
    """The message as mboxrd stores it: LF endings, ``>*From `` lines quoted once
    more, ending with exactly one LF; chunk boundaries may fall anywhere."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut:
            yield _quoted(data[:cut].replace(b"\r\n", b"\n"))
    if carry:
        line = carry[:-1] if carry.endswith(b"\r") else carry
        yield _quoted(line) + b"\n"


def _quoted(lines: bytes) -> bytes:
    """`lines` with each ``>*From `` line start quoted once more.  The pattern
    cannot use a literal prefix to skip ahead (``>*`` may be empty) and tried every
    byte: 0.6 ms of GIL per 100 KB, where a search for "From " takes 0.05 ms and
    finds none in most mail."""
    return _QUOTE_RE.sub(rb">\1", lines) if b"From " in lines else lines


def unescape(stored: bytes) -> bytes:
    return _UNQUOTE_RE.sub(rb"\1", stored)


def _from_line(sender: str, when: float) -> bytes:
    return f"From {sender} {time.asctime(time.gmtime(when))}\n".encode("utf-8", "replace")


def _from_time(line: bytes) -> float | None:
    parts = line.split()
    try:
        stamp = time.strptime(b" ".join(parts[-5:]).decode("ascii"), "%a %b %d %H:%M:%S %Y")
    except (ValueError, UnicodeDecodeError):
        return None
    return float(calendar.timegm(stamp))


def split_messages(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(offset, From line, stored message without the trailing empty line) for every
    message of an mbox file's contents."""
    starts = [m.start() for m in _SEPARATOR_RE.finditer(data)]
    out = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        nl = data.find(b"\n", start, end)
        if nl < 0:
            continue
        body = data[nl + 1 : end]
        if body.endswith(b"\n\n"):
            body = body[:-1]
        out.append((start, data[start : nl + 1], body))
    return out


@implementer(IMailStore)
class MboxStore:
    """mbox files under `mail_root`.  `fsync` and `clock` are injectable for tests."""

    name = "mbox"

    def __init__(
        self,
        mail_root: str,
        *,
        fsync: Callable[[int], None] = os.fsync,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 30.0,
        stale_lock_after: float = 300.0,
    ):
        self.mail_root = mail_root
        self._fsync = fsync
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._stale_after = stale_lock_after
        self._known_dirs: set[str] = set()

    # -- paths and locking -------------------------------------------------------

    def mailbox_path(self, mailbox) -> str:
        """The mbox file of `mailbox`; raises UnsafeMailboxName."""
        return mailbox_location(self.mail_root, mailbox, ".mbox")

    def _lock(self, path: str, create: bool = True) -> MailboxLock:
        return MailboxLock(
            path, timeout=self._lock_timeout, stale_after=self._stale_after, create=create
        )

    def _ensure_dir(self, directory: str) -> None:
        if directory in self._known_dirs:
            return
        make_dirs_durably(directory, self._fsync)
        self._known_dirs.add(directory)

    def _recover(self, path: str, fd: int) -> None:
        """Under the lock: undo an append that an earlier process did not finish."""
        sidecar = path + ".appending"
        try:
            with open(sidecar, "rb") as f:
                text = f.read().split()
        except FileNotFoundError:
            return
        try:
            mbox_size, tags_size = int(text[0]), int(text[1])
        except (IndexError, ValueError):
            mbox_size = tags_size = None  # torn sidecar: written before any append
        if mbox_size is not None:
            if os.fstat(fd).st_size > mbox_size:
                os.ftruncate(fd, mbox_size)
                self._fsync(fd)
            self._truncate(path + ".tags", tags_size)
        os.unlink(sidecar)
        fsync_dir(os.path.dirname(path), self._fsync)

    def _truncate(self, path: str, size: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
                self._fsync(fd)
        finally:
            os.close(fd)

    def _read_locked(self, mailbox) -> tuple[str, bytes]:
        path = self.mailbox_path(mailbox)
        if not os.path.exists(path):
            return path, b""
        with self._lock(path, create=False) as fd:
            self._recover(path, fd)
            return path, _read_all(fd)

    # -- IMailStore ----------------------------------------------------------------

    def create_mailbox(self, mailbox) -> str:
        path = self.mailbox_path(mailbox)
        self._ensure_dir(os.path.dirname(path))
        if not os.path.exists(path):
            with self._lock(path) as fd:
                self._fsync(fd)
            fsync_dir(os.path.dirname(path), self._fsync)
        return path

    def remove_mailbox(self, mailbox) -> bool:
        path = self.mailbox_path(mailbox)
        if not os.path.exists(path):
            return False
        with self._lock(path, create=False):
            for name in (path, path + ".tags", path + ".appending"):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        fsync_dir(os.path.dirname(path), self._fsync)
        return True

    def probe(self) -> str:
        """The store's root takes a new file (created, written, removed)."""
        return probe_writable(self.mail_root)

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        path = self.mailbox_path(mailbox)
        if not os.path.exists(path):
            return False
        with self._lock(path, create=False) as fd:
            self._recover(path, fd)
            return message_tag in self._tags(path)

    def _tags(self, path: str) -> set[str]:
        try:
            with open(path + ".tags", "rb") as f:
                return set(f.read().decode("ascii", "replace").split())
        except FileNotFoundError:
            return set()

    def list_messages(self, mailbox) -> list[StoredMessage]:
        path, data = self._read_locked(mailbox)
        mtime = os.stat(path).st_mtime if data else 0.0
        return [
            StoredMessage(message_id, len(unescape(body)), _from_time(line) or mtime, "INBOX")
            for message_id, (_, line, body) in _identify(data)
        ]

    def read_message(self, mailbox, message_id: str) -> bytes:
        """The message without its From line, unquoted, with LF line endings."""
        _, data = self._read_locked(mailbox)
        for found, (_, _, body) in _identify(data):
            if found == message_id:
                return unescape(body)
        raise KeyError(message_id)

    def delete_message(self, mailbox, message_id: str) -> None:
        """Rewrite the file without the message (a temporary file renamed over it,
        under the lock)."""
        path = self.mailbox_path(mailbox)
        if not os.path.exists(path):
            raise KeyError(message_id)
        with self._lock(path, create=False) as fd:
            self._recover(path, fd)
            data = _read_all(fd)
            for found, (offset, line, body) in _identify(data):
                if found == message_id:
                    end = offset + len(line) + len(body)
                    if data[end : end + 1] == b"\n":
                        end += 1
                    break
            else:
                raise KeyError(message_id)
            tmp = f"{path}.{os.getpid()}.rewrite"
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                write_all(out, [data[:offset], data[end:]])
                self._fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path), self._fsync)

    # -- delivery ------------------------------------------------------------------

    def deliver_batch(self, items: Sequence[StoreItem]) -> list:
        """Append each item; one lock, one sidecar and one fsync per mbox file."""
        results: list = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            try:
                if not _TAG_RE.match(item.message_tag):
                    raise ValueError(f"bad message tag {item.message_tag!r}")
                groups.setdefault(self.mailbox_path(item.mailbox), []).append(i)
            except Exception as e:
                results[i] = e
        for path, indexes in groups.items():
            try:
                self._append(path, [items[i] for i in indexes], indexes, results)
            except Exception as e:
                for i in indexes:
                    results[i] = e
        return results

    def _append(self, path: str, batch: list, indexes: list[int], results: list) -> None:
        self._ensure_dir(os.path.dirname(path))
        with self._lock(path) as fd:
            self._recover(path, fd)
            tags = self._tags(path) if any(item.check_existing for item in batch) else set()
            start = os.lseek(fd, 0, os.SEEK_END)
            tags_size = _size(path + ".tags")
            self._write_sidecar(path, start, tags_size)
            written: list[tuple[int, str]] = []
            end = start
            for item, i in zip(batch, indexes):
                if item.check_existing and item.message_tag in tags:
                    results[i] = f"{path}#{item.message_tag}"
                    continue
                try:
                    end = self._append_one(fd, end, item)
                except Exception as e:
                    os.ftruncate(fd, end)  # this item only: the others stay
                    os.lseek(fd, end, os.SEEK_SET)
                    results[i] = e
                    continue
                tags.add(item.message_tag)
                written.append((i, item.message_tag))
            if written:
                self._fsync(fd)
                tag_fd = os.open(path + ".tags", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    write_all(tag_fd, [f"{tag}\n".encode() for _, tag in written])
                    self._fsync(tag_fd)
                finally:
                    os.close(tag_fd)
            os.unlink(path + ".appending")
            fsync_dir(os.path.dirname(path), self._fsync)
            for i, tag in written:
                results[i] = f"{path}#{tag}"

    def _write_sidecar(self, path: str, mbox_size: int, tags_size: int) -> None:
        sidecar = path + ".appending"
        fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, [f"{mbox_size} {tags_size}\n".encode()])
            self._fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path), self._fsync)

    def _append_one(self, fd: int, offset: int, item: StoreItem) -> int:
        os.lseek(fd, offset, os.SEEK_SET)
        body = item.body
        sender = sender_of(item.prefix, body.header_block(8192))
        total = 0

        def counted():
            nonlocal total
            yield item.prefix
            for chunk in body.chunks():
                total += len(chunk)
                yield chunk

        pending = [_from_line(sender, self._clock())]
        size = len(pending[0])
        for piece in escape_lines(counted()):
            pending.append(piece)
            size += len(piece)
            if size > 1 << 20:
                write_all(fd, pending)
                offset += size
                pending, size = [], 0
        if total != body.size:
            raise OSError(errno.EIO, "message body is not as long as recorded")
        pending.append(b"\n")
        offset += size + 1
        write_all(fd, pending)
        return offset


def _identify(data: bytes) -> list[tuple[str, tuple[int, bytes, bytes]]]:
    seen: dict[str, int] = {}
    out = []
    for message in split_messages(data):
        _, line, body = message
        digest = hashlib.sha256(line + body).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        out.append((digest if seen[digest] == 1 else f"{digest}-{seen[digest]}", message))
    return out


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
