"""PostgreSQL stopped and started again under a running mta.db (a private server,
tests/pg.py `PrivateCluster`): while it is down every operation fails with
`DatabaseUnavailable` (the mail store reports an OSError, so mail stays queued);
once it is back the same `Database` and store work again, without reopening."""

from __future__ import annotations

import errno

import pytest

from mta.db import Database, DatabaseUnavailable
from mta.envelope import Address
from mta.storage import StoreItem
from mta.storage.sql import SQLStore
from mta.testing import MemoryBody
from tests.pg import private_cluster

BOB = Address("bob", "example.test")
MESSAGE = b"Subject: restart\r\n\r\nafter the restart\r\n"


@pytest.fixture
def cluster():
    with private_cluster() as cluster:
        yield cluster


def deliver(store, tag):
    return store.deliver_batch([StoreItem(BOB, tag, b"", MemoryBody(MESSAGE))])[0]


def test_operations_fail_while_down_and_work_once_restarted(cluster):
    db = Database(cluster.dsn)
    store = SQLStore(cluster.dsn)
    db.add_user("alice@example.test")
    assert isinstance(deliver(store, "before"), str)

    cluster.stop()
    with pytest.raises(DatabaseUnavailable, match=f"127.0.0.1:{cluster.port}.* unavailable"):
        db.get_user("alice@example.test")
    with pytest.raises(DatabaseUnavailable):
        db.add_user("bob@example.test")
    outcome = deliver(store, "during")
    assert isinstance(outcome, OSError) and outcome.errno == errno.EIO
    assert "mail database" in str(outcome)

    cluster.start()
    assert db.get_user("alice@example.test") is not None
    db.add_user("bob@example.test")
    assert isinstance(deliver(store, "during"), str)  # the queue's retry
    assert [h.subject for h in store.search("restart")] == ["restart", "restart"]
    db.close()
    store.close()


def test_a_restart_between_operations_is_not_even_noticed(cluster):
    db = Database(cluster.dsn)
    db.add_user("alice@example.test")
    cluster.stop()
    cluster.start()
    # Every thread's idle connection is stale now: the first statement of a read and
    # the BEGIN of a write find out and retry once on a new connection.
    assert db.get_user("alice@example.test") is not None
    cluster.stop()
    cluster.start()
    db.add_user("bob@example.test")
    assert len(db.list_users()) == 2
    db.close()
