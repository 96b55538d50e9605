"""The `IMailStore` contract: every backend passes the same tests.

Add a backend to `BACKENDS` below (``routing`` is a `RoutingStore` sending BOX's
domain to mbox; ``encrypted-*`` an `EncryptingStore` over a backend; ``s3`` and
``encrypted-s3`` the S3 store, which seals its objects itself, on a real S3 server,
its index in SQLite, and ``*-postgresql`` the same on PostgreSQL).  Two
documented exceptions: mbox's norm is LF line endings and a ``From `` separator
line, so what mbox reads back is what was delivered with CRLF turned into LF
(`expected`); every other store gives back the delivered bytes exactly.  An
encrypted store lists the sizes of its blobs (`stored_size`).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
from zope.interface.verify import verifyObject

from mta.envelope import Address
from mta.interfaces import IMailStore
from mta.queue.body import FileBody
from mta.storage import StoredMessage, StoreItem, UnsafeMailboxName
from mta.storage.crypto import OVERHEAD, Keyring
from mta.storage.encrypted import EncryptingStore
from mta.storage.maildir import MaildirStore
from mta.storage.mbox import MboxStore
from mta.storage.routing import RoutingStore
from mta.storage.sql import SQLStore
from mta.storage.timeseries import ArchiveStore
from mta.testing import MemoryBody

BACKENDS = {
    "maildir": lambda root: MaildirStore(str(root / "mail"), "mx.example.test"),
    "mbox": lambda root: MboxStore(str(root / "mail"), lock_timeout=10),
    "timeseries": lambda root: ArchiveStore(str(root / "archive")),
    "routing": lambda root: RoutingStore(
        ArchiveStore(str(root / "archive")), {"example.test": MboxStore(str(root / "mail"))}
    ),
    "encrypted-maildir": lambda root: EncryptingStore(
        MaildirStore(str(root / "mail"), "mx.example.test"), KEYRING
    ),
    "encrypted-timeseries": lambda root: EncryptingStore(
        ArchiveStore(str(root / "archive")), KEYRING
    ),
    "sql": lambda root: SQLStore(str(root / "mta.db")),
}
# Backends on a fresh PostgreSQL database (tests/conftest.py `postgres_dsn`).
POSTGRES_BACKENDS = {
    "sql-postgresql": lambda dsn: SQLStore(dsn),
}
KEYRING = Keyring.of(bytes(range(32)))
# The S3 store against the session's real S3 server (tests/storage/conftest.py), its
# index in SQLite under the test's directory.
S3_BACKENDS = {"s3": None, "encrypted-s3": KEYRING}
# The same with the index on a fresh PostgreSQL database.
S3_POSTGRES_BACKENDS = {"s3-postgresql": None, "encrypted-s3-postgresql": KEYRING}

BOX = Address("bob", "example.test")
PREFIX = b"Return-Path: <alice@remote.test>\r\nDelivered-To: bob@example.test\r\n"
MESSAGE = (
    b"From: Alice <alice@remote.test>\r\nSubject: caf\xc3\xa9 \xff\r\n\r\n"
    b"From the start\r\n>From quoted\r\n>>From twice\r\n\r\nbare\rCR and 8-bit \x80\xfe\r\n"
    b".\r\n\r\n"
)


@pytest.fixture(
    params=sorted([*BACKENDS, *S3_BACKENDS]) + sorted([*POSTGRES_BACKENDS, *S3_POSTGRES_BACKENDS])
)
def backend(request):
    return request.param


@pytest.fixture
def make_store(backend, tmp_path, request):
    if backend in S3_BACKENDS:
        make_s3 = request.getfixturevalue("s3_store_factory")
        return lambda: make_s3(tmp_path, S3_BACKENDS[backend])
    if backend in S3_POSTGRES_BACKENDS:
        make_s3 = request.getfixturevalue("s3_store_factory")
        dsn = request.getfixturevalue("postgres_dsn")
        return lambda: make_s3(tmp_path, S3_POSTGRES_BACKENDS[backend], index=dsn)
    if backend in POSTGRES_BACKENDS:
        dsn = request.getfixturevalue("postgres_dsn")
        return lambda: POSTGRES_BACKENDS[backend](dsn)
    return lambda: BACKENDS[backend](tmp_path)


@pytest.fixture
def store(make_store):
    return make_store()


def expected(store, data: bytes) -> bytes:
    """What `read_message` gives back for delivered `data`: mbox stores LF lines."""
    if hasattr(store, "store_for"):  # a RoutingStore: what BOX's domain uses
        store = store.store_for(BOX)
    return data.replace(b"\r\n", b"\n") if store.name == "mbox" else data


def stored_size(store, data: bytes, tag: str) -> int:
    """The size `list_messages` gives for `data` stored with `tag`: an encrypted
    store lists its blobs."""
    return len(data) + OVERHEAD + len(tag) if isinstance(store, EncryptingStore) else len(data)


def item(tag, data=MESSAGE, box=BOX, prefix=PREFIX, check_existing=False, tmp_path=None):
    if tmp_path is not None:  # a queue file with a trailer that is not the message
        path = tmp_path / f"queued-{tag}"
        path.write_bytes(data + b"TRAILER")
        body = FileBody(b"", str(path), len(data))
    else:
        body = MemoryBody(data)
    return StoreItem(box, tag, prefix, body, check_existing)


def deliver(store, *items):
    results = store.deliver_batch(list(items))
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def contents(store, box=BOX) -> list[bytes]:
    return [store.read_message(box, m.message_id) for m in store.list_messages(box)]


def test_provides_the_interface(store):
    assert verifyObject(IMailStore, store)
    assert store.probe()


@pytest.mark.parametrize("body_kind", ["memory", "file"])
def test_deliver_list_read_back(store, tmp_path, body_kind):
    queued = tmp_path if body_kind == "file" else None
    [where] = deliver(store, item("00aa-0", tmp_path=queued))
    assert isinstance(where, str)
    [msg] = store.list_messages(BOX)
    assert isinstance(msg, StoredMessage) and msg.folder == "INBOX"
    data = store.read_message(BOX, msg.message_id)
    assert data == expected(store, PREFIX + MESSAGE)
    assert msg.size == stored_size(store, data, "00aa-0") and msg.received > 0


def test_messages_are_listed_oldest_first_and_ids_stay(store):
    deliver(store, item("00aa-0", b"Subject: one\r\n\r\n1\r\n"))
    first = store.list_messages(BOX)
    deliver(
        store, item("00ab-0", b"Subject: two\r\n\r\n2\r\n"), item("00ac-0", b"S: 3\r\n\r\n3\r\n")
    )
    listed = store.list_messages(BOX)
    assert listed[0].message_id == first[0].message_id
    assert [d.rstrip(b"\r\n")[-1:] for d in contents(store)] == [b"1", b"2", b"3"]


def test_delete(store):
    deliver(store, item("00aa-0", b"S: a\r\n\r\na\r\n"), item("00ab-0", b"S: b\r\n\r\nb\r\n"))
    a, b = store.list_messages(BOX)
    store.delete_message(BOX, a.message_id)
    assert [m.message_id for m in store.list_messages(BOX)] == [b.message_id]
    assert store.read_message(BOX, b.message_id) == expected(store, PREFIX + b"S: b\r\n\r\nb\r\n")
    with pytest.raises(KeyError):
        store.delete_message(BOX, a.message_id)
    with pytest.raises(KeyError):
        store.read_message(BOX, a.message_id)
    for bad in ("../x", "/etc/passwd", "", "new/../../x"):
        with pytest.raises(KeyError):
            store.read_message(BOX, bad)


def test_check_existing_skips_duplicates(store):
    assert not store.has_delivered(BOX, "00aa-0")
    deliver(store, item("00aa-0"))
    assert store.has_delivered(BOX, "00aa-0")
    assert not store.has_delivered(BOX, "00aa-1")
    assert not store.has_delivered(BOX, "00aa-")
    [again] = deliver(store, item("00aa-0", check_existing=True))
    assert isinstance(again, str)
    assert len(store.list_messages(BOX)) == 1
    deliver(store, item("00aa-1", check_existing=True))
    assert len(store.list_messages(BOX)) == 2


@pytest.mark.parametrize(
    "local,domain",
    [("..", "example.test"), (".", "example.test"), (".hidden", "example.test"), ("a/b", "example.test"),
     ("a\x00b", "example.test"), ("bob", ".."), ("bob", "a/b"), ("", "example.test"), ("bob", ""),
     ("a\nb", "example.test"), ("x" * 300, "example.test")],
)  # fmt: skip
def test_unsafe_mailbox_names_are_refused(store, tmp_path, local, domain):
    box = Address(local, domain)
    [outcome] = store.deliver_batch([item("00aa-0", box=box)])
    assert isinstance(outcome, UnsafeMailboxName)
    with pytest.raises(UnsafeMailboxName):
        store.create_mailbox(box)
    # (The SQL store's database is no leftover: it holds every mailbox.)
    leftovers = [
        f for _, _, files in os.walk(tmp_path) for f in files if not f.startswith("mta.db")
    ]
    assert leftovers == []


def test_one_bad_item_does_not_stop_the_batch(store):
    bad = Address("..", "example.test")
    results = store.deliver_batch([item("00aa-0", box=bad), item("00aa-1"), item("bad tag!")])
    assert isinstance(results[0], UnsafeMailboxName)
    assert isinstance(results[1], str)
    assert isinstance(results[2], ValueError)
    assert len(store.list_messages(BOX)) == 1


def test_create_and_remove_mailbox(store):
    other = Address("carol", "example.test")
    store.create_mailbox(other)
    assert store.list_messages(other) == []
    deliver(store, item("00aa-0", box=other))
    assert len(store.list_messages(other)) == 1
    assert store.remove_mailbox(other) is True
    assert store.list_messages(other) == []
    assert not store.has_delivered(other, "00aa-0")
    assert store.remove_mailbox(other) is False
    deliver(store, item("00aa-1", box=other))  # and it can be made again
    assert len(store.list_messages(other)) == 1


def test_a_short_body_is_an_error_and_leaves_nothing(store, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abc")
    deliver(store, item("00aa-0"))
    short = StoreItem(BOX, "00aa-1", b"", FileBody(b"", str(path), 10))
    [outcome] = store.deliver_batch([short])
    assert isinstance(outcome, OSError)
    assert contents(store) == [expected(store, PREFIX + MESSAGE)]
    assert not store.has_delivered(BOX, "00aa-1")


def test_concurrent_delivery_to_one_mailbox(store):
    def worker(n):
        for i in range(10):
            data = b"Subject: %d-%d\r\n\r\n" % (n, i) + MESSAGE
            deliver(store, item(f"{n:02d}cc-{i}", data))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted(contents(store))
    want = sorted(
        expected(store, PREFIX + b"Subject: %d-%d\r\n\r\n" % (n, i) + MESSAGE)
        for n in range(4)
        for i in range(10)
    )
    assert got == want


class KillingBody(MemoryBody):
    """A body whose delivery is killed (SIGKILL) after half of it was written."""

    def chunks(self, chunk_size=262144):
        yield self.data[: len(self.data) // 2]
        os.kill(os.getpid(), signal.SIGKILL)

    def copy_into(self, fd, prefix=b""):
        os.write(fd, prefix + self.data[: len(self.data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_delivery_killed_midway_leaves_no_half_message(make_store):
    store = make_store()
    deliver(store, item("00aa-0"))
    big = MESSAGE * 200
    pid = os.fork()
    if pid == 0:  # the child: a delivery process that gets kill -9'd mid-write
        try:
            child = make_store()
            child.deliver_batch([StoreItem(BOX, "00aa-1", PREFIX, KillingBody(big))])
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    reopened = make_store()
    assert contents(reopened) == [expected(reopened, PREFIX + MESSAGE)]
    assert not reopened.has_delivered(BOX, "00aa-1")
    deliver(reopened, item("00aa-1", big, check_existing=True))
    assert contents(reopened) == [
        expected(reopened, PREFIX + MESSAGE),
        expected(reopened, PREFIX + big),
    ]
