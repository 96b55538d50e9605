"""mbox store: the file format mail readers expect, locking and recovery.

(What every store does is in test_contract.py.)"""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
import time

import pytest

from mta.envelope import Address
from mta.storage import StoreItem
from mta.storage.locking import MailboxBusy, MailboxLock
from mta.storage.mbox import MboxStore, escape_lines, sender_of
from mta.testing import MemoryBody

BOX = Address("bob", "example.test")
WHEN = 1_700_000_000.0  # Tue Nov 14 22:13:20 2023 UTC


def store_at(tmp_path, **kwargs):
    return MboxStore(str(tmp_path / "mail"), clock=lambda: WHEN, **kwargs)


def deliver(store, tag, data, prefix=b"Return-Path: <alice@remote.test>\r\n"):
    [outcome] = store.deliver_batch([StoreItem(BOX, tag, prefix, MemoryBody(data))])
    assert isinstance(outcome, str), outcome
    return outcome


def test_the_file_is_mboxrd_with_lf_lines(tmp_path):
    store = store_at(tmp_path)
    deliver(store, "00aa-0", b"Subject: hi\r\n\r\nFrom here\r\n>From there\r\nend\r\n")
    deliver(store, "00aa-1", b"Subject: two\r\n\r\nno newline at the end", prefix=b"")
    path = tmp_path / "mail" / "example.test" / "bob.mbox"
    assert path.read_bytes() == (
        b"From alice@remote.test Tue Nov 14 22:13:20 2023\n"
        b"Return-Path: <alice@remote.test>\nSubject: hi\n\n>From here\n>>From there\nend\n\n"
        b"From MAILER-DAEMON Tue Nov 14 22:13:20 2023\n"
        b"Subject: two\n\nno newline at the end\n\n"
    )
    first, second = store.list_messages(BOX)
    assert store.read_message(BOX, first.message_id) == (
        b"Return-Path: <alice@remote.test>\nSubject: hi\n\nFrom here\n>From there\nend\n"
    )
    assert first.received == WHEN
    assert sorted(os.listdir(path.parent)) == ["bob.mbox", "bob.mbox.tags"]


def test_python_mailbox_reads_what_we_wrote(tmp_path):
    store = MboxStore(str(tmp_path / "mail"))
    deliver(store, "00aa-0", b"Subject: one\r\n\r\nline\r\n\r\n")
    deliver(store, "00aa-1", b"Subject: two\r\n\r\nFrom quoted\r\n", prefix=b"Return-Path: <>\r\n")
    box = mailbox.mbox(str(tmp_path / "mail" / "example.test" / "bob.mbox"), create=False)
    try:
        one, two = box.values()
        assert one["Subject"] == "one" and two["Subject"] == "two"
        assert one.get_from().startswith("alice@remote.test ")
        assert two.get_from().startswith("MAILER-DAEMON ")
        ours = [store.read_message(BOX, m.message_id) for m in store.list_messages(BOX)]
        assert box.get_bytes(box.keys()[0]) == ours[0]
        # Python's mbox does not unquote (mboxo): it sees the quoted line.
        assert box.get_bytes(box.keys()[1]).endswith(b"\n>From quoted\n")
    finally:
        box.close()


@pytest.mark.parametrize(
    "prefix,header,sender",
    [
        (b"Return-Path: <a@b.test>\r\n", b"", "a@b.test"),
        (b"Return-Path: <>\r\n", b"", "MAILER-DAEMON"),
        (b"", b"Return-Path: x@y.test\r\n", "x@y.test"),
        (b"", b"", "MAILER-DAEMON"),
        (b"Return-Path: <a b@c.test>\r\n", b"", "ab@c.test"),
    ],
)
def test_sender_of(prefix, header, sender):
    assert sender_of(prefix, header) == sender


def test_escaping_does_not_depend_on_chunk_boundaries():
    data = b"From a\r\n>From b\r\nx From c\r\n>>From d\r\n\r\nlast\r"
    whole = b"".join(escape_lines([data]))
    assert whole == b">From a\n>>From b\nx From c\n>>>From d\n\nlast\n"
    assert b"".join(escape_lines(data[i : i + 1] for i in range(len(data)))) == whole


def test_an_unfinished_append_is_cut_off_when_the_mailbox_is_next_locked(tmp_path):
    store = store_at(tmp_path)
    deliver(store, "00aa-0", b"Subject: kept\r\n\r\nkept\r\n")
    path = tmp_path / "mail" / "example.test" / "bob.mbox"
    size, tags = path.stat().st_size, (tmp_path / "mail/example.test/bob.mbox.tags").stat().st_size
    (tmp_path / "mail/example.test/bob.mbox.appending").write_bytes(b"%d %d\n" % (size, tags))
    with open(path, "ab") as f:
        f.write(b"From x Tue Nov 14 22:13:20 2023\nSubject: half\n\nhal")
    with open(tmp_path / "mail/example.test/bob.mbox.tags", "ab") as f:
        f.write(b"00aa-1\n")
    reopened = store_at(tmp_path)
    [msg] = reopened.list_messages(BOX)
    assert reopened.read_message(BOX, msg.message_id).endswith(b"kept\n")
    assert path.stat().st_size == size
    assert not reopened.has_delivered(BOX, "00aa-1")
    assert not (tmp_path / "mail/example.test/bob.mbox.appending").exists()


def test_delete_rewrites_the_file_and_keeps_the_others(tmp_path):
    store = store_at(tmp_path)
    for i in range(3):
        deliver(store, f"00aa-{i}", b"Subject: %d\r\n\r\nFrom %d\r\n" % (i, i))
    ids = [m.message_id for m in store.list_messages(BOX)]
    store.delete_message(BOX, ids[1])
    assert [m.message_id for m in store.list_messages(BOX)] == [ids[0], ids[2]]
    assert store.read_message(BOX, ids[2]).endswith(b"\nFrom 2\n")
    assert sorted(os.listdir(tmp_path / "mail" / "example.test")) == [
        "bob.mbox",
        "bob.mbox.tags",
    ]


def test_identical_messages_get_distinct_ids(tmp_path):
    store = store_at(tmp_path)
    deliver(store, "00aa-0", b"Subject: same\r\n\r\n")
    deliver(store, "00aa-1", b"Subject: same\r\n\r\n")
    a, b = store.list_messages(BOX)
    assert b.message_id == a.message_id + "-2"
    store.delete_message(BOX, b.message_id)
    assert [m.message_id for m in store.list_messages(BOX)] == [a.message_id]


def test_a_dotlock_of_a_dead_process_is_stale(tmp_path):
    store = store_at(tmp_path)
    store.create_mailbox(BOX)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    lock = tmp_path / "mail" / "example.test" / "bob.mbox.lock"
    lock.write_bytes(dead + b"\n")
    deliver(store, "00aa-0", b"Subject: x\r\n\r\n")
    assert not lock.exists()


def test_a_live_dotlock_makes_the_mailbox_busy_until_it_is_old(tmp_path):
    store = store_at(tmp_path, lock_timeout=0.1, stale_lock_after=600)
    store.create_mailbox(BOX)
    lock = tmp_path / "mail" / "example.test" / "bob.mbox.lock"
    lock.write_bytes(b"%d\n" % os.getppid())  # a live process that is not us
    [outcome] = store.deliver_batch([StoreItem(BOX, "00aa-0", b"", MemoryBody(b"S: x\r\n\r\n"))])
    assert isinstance(outcome, MailboxBusy) and isinstance(outcome, OSError)
    with pytest.raises(MailboxBusy):
        store.list_messages(BOX)  # readers wait for the lock too
    old = time.time() - 3600
    os.utime(lock, (old, old))
    deliver(store, "00aa-0", b"Subject: x\r\n\r\n")
    assert not lock.exists() and len(store.list_messages(BOX)) == 1


def test_an_fcntl_lock_held_elsewhere_makes_the_mailbox_busy(tmp_path):
    store = store_at(tmp_path, lock_timeout=0.1)
    path = store.create_mailbox(BOX)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.lockf(f, fcntl.LOCK_EX);"
         " print('locked', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxBusy):
            with MailboxLock(path, timeout=0.1):
                pass
        [outcome] = store.deliver_batch(
            [StoreItem(BOX, "00aa-0", b"", MemoryBody(b"S: x\r\n\r\n"))]
        )
        assert isinstance(outcome, MailboxBusy)
    finally:
        holder.stdin.close()
        holder.wait()
    deliver(store, "00aa-0", b"Subject: x\r\n\r\n")
    assert not os.path.exists(path + ".lock")
