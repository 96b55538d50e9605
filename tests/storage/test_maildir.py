"""Maildir store: durable delivery, duplicate detection, safe names."""

from __future__ import annotations

import errno
import os

import pytest
from zope.interface.verify import verifyObject

from mta.envelope import Address
from mta.interfaces import IMailStore
from mta.queue.body import FileBody
from mta.storage import StoredMessage, StoreItem
from mta.storage.maildir import MaildirStore, UnsafeMailboxName
from tests.queue.doubles import FsyncCounter


def item(box, tag, prefix, source, length, check_existing=False, memory=None):
    """A StoreItem whose body is the first `length` bytes of `source` (a queue file)."""
    return StoreItem(box, tag, prefix, FileBody(b"", source, length, memory), check_existing)


def deliver(store, box, tag, prefix, source, length):
    [outcome] = store.deliver_batch([item(box, tag, prefix, source, length)])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "queued"
    path.write_bytes(b"Subject: x\r\n\r\nbody\r\n" + b"TRAILER-NOT-COPIED")
    return str(path)


BODY_LEN = len(b"Subject: x\r\n\r\nbody\r\n")


def test_interface(tmp_path):
    assert verifyObject(IMailStore, MaildirStore(str(tmp_path)))


def test_deliver_writes_prefix_and_body_into_new(tmp_path, source):
    fsync = FsyncCounter()
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test", fsync=fsync)
    box = Address("Bob", "Example.Test")
    location = deliver(store, box, "00aa-0", b"Delivered-To: bob\r\n", source, BODY_LEN)
    maildir = tmp_path / "mail" / "example.test" / "bob"
    assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]
    [name] = os.listdir(maildir / "new")
    assert location == str(maildir / "new" / name)
    assert "Q00aa-0.mx.example.test" in name and name.endswith(f",S={19 + BODY_LEN}")
    assert (
        maildir / "new" / name
    ).read_bytes() == b"Delivered-To: bob\r\nSubject: x\r\n\r\nbody\r\n"
    assert os.listdir(maildir / "tmp") == []
    fsync.dirs = fsync.files = 0
    deliver(store, box, "00aa-1", b"", source, BODY_LEN)
    assert (fsync.files, fsync.dirs) == (1, 1)  # the mailbox exists now: file + new/


def test_has_delivered_looks_in_new_and_cur(tmp_path, source):
    store = MaildirStore(str(tmp_path))
    box = Address("bob", "example.test")
    assert not store.has_delivered(box, "00aa-1")
    path = deliver(store, box, "00aa-1", b"", source, BODY_LEN)
    assert store.has_delivered(box, "00aa-1")
    assert not store.has_delivered(box, "00aa-11")
    assert not store.has_delivered(box, "00aa-")
    cur = path.replace("/new/", "/cur/") + ":2,S"
    os.rename(path, cur)
    assert store.has_delivered(box, "00aa-1")


@pytest.mark.parametrize(
    "local,domain",
    [("..", "example.test"), (".", "example.test"), (".hidden", "example.test"), ("a/b", "example.test"),
     ("a\x00b", "example.test"), ("bob", ".."), ("bob", "a/b"), ("", "example.test"), ("bob", ""),
     ("a\nb", "example.test"), ("x" * 300, "example.test")],
)  # fmt: skip
def test_unsafe_names_are_refused(tmp_path, source, local, domain):
    store = MaildirStore(str(tmp_path / "mail"))
    with pytest.raises(UnsafeMailboxName):
        deliver(store, Address(local, domain), "00aa-0", b"", source, BODY_LEN)
    with pytest.raises(UnsafeMailboxName):
        store.create_mailbox(Address(local, domain))
    assert not os.path.exists(tmp_path / "mail") or os.listdir(tmp_path / "mail") == []


def test_batch_fsyncs_each_new_dir_once(tmp_path, source):
    fsync = FsyncCounter()
    store = MaildirStore(str(tmp_path), fsync=fsync)
    a, b = Address("a", "example.test"), Address("b", "example.test")
    store.create_mailbox(a)
    store.create_mailbox(b)
    fsync.dirs = fsync.files = 0
    items = [item(box, f"00aa-{i}", b"", source, BODY_LEN) for i, box in enumerate([a, b, a, a, b])]
    results = store.deliver_batch(items)
    assert all(isinstance(r, str) for r in results)
    assert (fsync.files, fsync.dirs) == (5, 2)


def test_batch_reports_errors_per_item(tmp_path, source):
    store = MaildirStore(str(tmp_path))
    good, bad = Address("a", "example.test"), Address("..", "example.test")
    results = store.deliver_batch(
        [
            item(bad, "00aa-0", b"", source, BODY_LEN),
            item(good, "00aa-1", b"", source, BODY_LEN),
        ]
    )
    assert isinstance(results[0], UnsafeMailboxName)
    assert isinstance(results[1], str)


def test_check_existing_skips_duplicates(tmp_path, source):
    store = MaildirStore(str(tmp_path))
    box = Address("a", "example.test")
    first = deliver(store, box, "00aa-0", b"", source, BODY_LEN)
    [again] = store.deliver_batch([item(box, "00aa-0", b"", source, BODY_LEN, check_existing=True)])
    assert again == first
    assert len(os.listdir(os.path.dirname(first))) == 1


def test_large_body_copied_in_bounded_memory(tmp_path):
    src = tmp_path / "big"
    data = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(data + b"trailer")
    store = MaildirStore(str(tmp_path / "mail"))
    path = deliver(store, Address("a", "example.test"), "00aa-0", b"X: y\r\n", str(src), len(data))
    assert open(path, "rb").read() == b"X: y\r\n" + data


def test_short_source_is_an_error_and_leaves_no_file(tmp_path):
    src = tmp_path / "short"
    src.write_bytes(b"abc")
    store = MaildirStore(str(tmp_path / "mail"))
    with pytest.raises(OSError) as e:
        deliver(store, Address("a", "example.test"), "00aa-0", b"", str(src), 10)
    assert e.value.errno == errno.EIO
    box = tmp_path / "mail" / "example.test" / "a"
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "new") == []


def test_parent_is_a_file(tmp_path, source):
    (tmp_path / "example.test").write_bytes(b"not a directory")
    store = MaildirStore(str(tmp_path))
    with pytest.raises(OSError) as e:
        deliver(store, Address("a", "example.test"), "00aa-0", b"", source, BODY_LEN)
    assert not isinstance(e.value, ValueError)  # storage trouble, not a bad name


def test_a_body_in_memory_is_written_without_reading_the_source(tmp_path):
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test")
    box = Address("bob", "example.test")
    body = [b"Subject: x\r\n", b"\r\n", b"body\r\n"]
    missing = str(tmp_path / "no-such-queue-file")
    one = item(box, "00ab-0", b"Delivered-To: bob\r\n", missing, BODY_LEN, memory=body)
    [location] = store.deliver_batch([one])
    with open(location, "rb") as f:
        assert f.read() == b"Delivered-To: bob\r\nSubject: x\r\n\r\nbody\r\n"


def test_a_body_in_memory_of_the_wrong_length_is_not_delivered(tmp_path):
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test")
    box = Address("bob", "example.test")
    one = item(box, "00ac-0", b"", "unused", BODY_LEN + 1, memory=[b"short\r\n"])
    [outcome] = store.deliver_batch([one])
    assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
    maildir = tmp_path / "mail" / "example.test" / "bob"
    assert os.listdir(maildir / "new") == [] and os.listdir(maildir / "tmp") == []


def test_mailbox_lifecycle_list_read_delete(tmp_path, source):
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test")
    box = Address("bob", "example.test")
    assert store.create_mailbox(box) == str(tmp_path / "mail" / "example.test" / "bob")
    assert store.list_messages(box) == []
    deliver(store, box, "00aa-0", b"Delivered-To: bob\r\n", source, BODY_LEN)
    [msg] = store.list_messages(box)
    assert isinstance(msg, StoredMessage) and msg.message_id.startswith("new/")
    assert msg.size == 19 + BODY_LEN
    assert (
        store.read_message(box, msg.message_id)
        == b"Delivered-To: bob\r\nSubject: x\r\n\r\nbody\r\n"
    )
    for bad in ("../new/x", "new/../../etc", "tmp/x", msg.message_id + "x"):
        with pytest.raises(KeyError):
            store.read_message(box, bad)
    store.delete_message(box, msg.message_id)
    assert store.list_messages(box) == []
    with pytest.raises(KeyError):
        store.delete_message(box, msg.message_id)
    assert store.probe() == "writable"
    assert store.remove_mailbox(box) is True
    assert not (tmp_path / "mail" / "example.test" / "bob").exists()
    assert store.remove_mailbox(box) is False


def test_nfc_and_nfd_spellings_reach_one_mailbox(tmp_path, source):
    store = MaildirStore(str(tmp_path / "mail"))
    nfc, nfd = Address("jos\u00e9", "example.test"), Address("jose\u0301", "example.test")
    assert store.create_mailbox(nfc) == store.create_mailbox(nfd)
    deliver(store, nfd, "00aa-0", b"", source, BODY_LEN)
    assert len(store.list_messages(nfc)) == 1


def test_messages_with_one_mtime_list_in_arrival_order(tmp_path):
    """Two deliveries inside one clock tick share an mtime; the names' unpadded
    microseconds then decide, as numbers (M99999 before M100000), not as text."""
    store = MaildirStore(str(tmp_path / "mail"), "mx.example.test")
    box = Address("bob", "example.test")
    new = tmp_path / "mail" / "example.test" / "bob" / "new"
    store.create_mailbox(box)
    names = [
        "1700000000.M99999P1Q00aa-0.mx,S=1",
        "1700000000.M100000P1Q00ab-0.mx,S=1",
        "1700000001.M5P1Q00ac-0.mx,S=1",
    ]
    for name in reversed(names):
        (new / name).write_bytes(b"x")
        os.utime(new / name, ns=(1_700_000_000_000_000_000,) * 2)
    assert [m.message_id for m in store.list_messages(box)] == [f"new/{n}" for n in names]
