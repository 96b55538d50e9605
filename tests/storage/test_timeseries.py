"""Time-series archive store: day directories, durable writes, bounded look-up.

(What every store does is in test_contract.py.)"""

from __future__ import annotations

import os

from mta.config import build_config
from mta.envelope import Address
from mta.storage import StoreItem, open_store
from mta.storage.mbox import MboxStore
from mta.storage.timeseries import ArchiveStore
from mta.testing import MemoryBody
from tests.queue.doubles import FsyncCounter

BOX = Address("Bob", "Example.Test")
DAY = 86400
WHEN = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def deliver(store, tag, data=b"Subject: x\r\n\r\nbody\r\n", check_existing=False):
    [outcome] = store.deliver_batch(
        [StoreItem(BOX, tag, b"Delivered-To: bob\r\n", MemoryBody(data), check_existing)]
    )
    assert isinstance(outcome, str), outcome
    return outcome


def test_messages_are_filed_by_utc_day(tmp_path):
    clock = Clock(WHEN)
    fsync = FsyncCounter()
    store = ArchiveStore(str(tmp_path / "archive"), clock=clock, fsync=fsync)
    where = deliver(store, "00aa-0")
    box = tmp_path / "archive" / "example.test" / "bob"
    assert os.path.dirname(where) == str(box / "2023" / "11" / "14")
    assert os.path.basename(where).endswith("Q00aa-0.eml")
    assert open(where, "rb").read() == b"Delivered-To: bob\r\nSubject: x\r\n\r\nbody\r\n"
    assert os.listdir(box / "tmp") == []
    fsync.files = fsync.dirs = 0
    deliver(store, "00aa-1")
    assert (fsync.files, fsync.dirs) == (1, 1)  # the day exists: the file and its day
    clock.now += 2 * 3600  # past midnight UTC
    deliver(store, "00aa-2")
    assert [m.message_id[:10] for m in store.list_messages(BOX)] == [
        "2023/11/14",
        "2023/11/14",
        "2023/11/15",
    ]


def test_has_delivered_looks_back_only_so_far(tmp_path):
    clock = Clock(WHEN)
    store = ArchiveStore(str(tmp_path / "archive"), clock=clock, lookback_days=3)
    deliver(store, "00aa-0")
    clock.now += 3 * DAY
    assert store.has_delivered(BOX, "00aa-0")
    clock.now += DAY + 1
    assert not store.has_delivered(BOX, "00aa-0")
    assert len(store.list_messages(BOX)) == 1  # still listed, of course
    clock.now = WHEN - DAY  # the clock went back a little: tomorrow is looked at too
    assert store.has_delivered(BOX, "00aa-0")


def test_a_fixed_clock_still_gives_unique_names(tmp_path):
    store = ArchiveStore(str(tmp_path / "archive"), clock=lambda: WHEN)
    first = deliver(store, "00aa-0")
    second = deliver(store, "00aa-0")
    assert first != second and len(store.list_messages(BOX)) == 2


def test_open_store_picks_the_configured_backend(tmp_path):
    def config(backend):
        return build_config(
            {
                "datadir": str(tmp_path),
                "storage": {"backend": backend},
                "queue": {"max_age": 10 * DAY},
            }
        )

    archive = open_store(config("timeseries"))
    assert isinstance(archive, ArchiveStore) and archive.name == "timeseries"
    assert archive.archive_root == str(tmp_path / "archive") and archive.lookback_days == 12
    mbox = open_store(config("mbox"))
    assert isinstance(mbox, MboxStore) and mbox.mail_root == str(tmp_path / "mail")
    assert open_store(config("maildir")).name == "maildir"
