"""Per-domain stores: ``[storage."<domain>"]`` tables and `RoutingStore`."""

from __future__ import annotations

import os

import pytest
from zope.interface.verify import verifyObject

from mta.config import ConfigError, build_config
from mta.envelope import Address
from mta.interfaces import IMailStore
from mta.storage import StoreItem, UnsafeMailboxName, open_store
from mta.storage.maildir import MaildirStore
from mta.storage.mbox import MboxStore
from mta.storage.routing import RoutingStore
from mta.testing import MemoryBody


def config(tmp_path, **storage):
    return build_config(
        {
            "datadir": str(tmp_path),
            "local_domains": ["example.test", "other.test", "archive.test"],
            "postmaster": "pm@example.test",
            "storage": storage,
        }
    )


def test_domains_go_to_their_own_backend(tmp_path):
    cfg = config(
        tmp_path, **{"other.test": {"backend": "mbox"}, "Archive.Test.": {"backend": "timeseries"}}
    )
    assert cfg.storage_domains == (("other.test", "mbox"), ("archive.test", "timeseries"))
    store = open_store(cfg)
    assert isinstance(store, RoutingStore) and verifyObject(IMailStore, store)
    assert store.name == "maildir"
    assert isinstance(store.store_for(Address("a", "OTHER.test")), MboxStore)
    assert isinstance(store.store_for(Address("a", "example.test")), MaildirStore)
    boxes = [Address("a", d) for d in ("example.test", "other.test", "archive.test", "..")]
    items = [
        StoreItem(box, f"00aa-{i}", b"", MemoryBody(b"S: x\r\n\r\n")) for i, box in enumerate(boxes)
    ]
    results = store.deliver_batch(items)
    assert "/mail/example.test/a/new/" in results[0]
    assert results[1].startswith(str(tmp_path / "mail" / "other.test" / "a.mbox"))
    assert results[2].startswith(str(tmp_path / "archive" / "archive.test" / "a" / "20"))
    assert isinstance(results[3], UnsafeMailboxName)
    assert [len(store.list_messages(box)) for box in boxes[:3]] == [1, 1, 1]
    assert store.has_delivered(boxes[1], "00aa-1") and not store.has_delivered(boxes[0], "00aa-1")
    assert store.probe().count("writable") == 3
    assert os.path.isfile(store.create_mailbox(Address("b", "other.test")))


def test_no_tables_no_routing(tmp_path):
    assert isinstance(open_store(config(tmp_path, backend="mbox")), MboxStore)


@pytest.mark.parametrize(
    "storage,key,text",
    [
        ({"remote.test": {"backend": "mbox"}}, "storage.remote.test", "not in local_domains"),
        ({"example": {"test": {"backend": "mbox"}}}, "storage.example", "needs quotes"),
        ({"other.test": {"backend": "nope"}}, "storage.other.test.backend", "must be one of"),
        ({"other.test": {"backend": "s3"}}, "storage.s3.endpoint", "required with backend"),
        ({"other.test": {"backend": "mbox", "x": 1}}, "storage.other.test.x", "unknown key"),
        ({"storage_domains": []}, "storage.storage_domains", "unknown key"),
    ],
)
def test_bad_tables_are_refused(tmp_path, storage, key, text):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, **storage)
    assert e.value.key == key and text in str(e.value)


def test_the_s3_table_is_still_reserved(tmp_path):
    cfg = config(tmp_path, s3={"bucket": "mail"})
    assert cfg.storage_domains == ()
