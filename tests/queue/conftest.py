"""Fixtures the PostgreSQL queue's test modules share."""

from __future__ import annotations

import pytest

from mta.queue.pgconn import Connections, apply_queue_schema
from tests.queue.pgtesting import private_database


@pytest.fixture(scope="module")
def dsn():
    """A private database with the queue's schema, one per test module."""
    with private_database() as dsn:
        conns = Connections(dsn)
        conns.run(apply_queue_schema)
        conns.close()
        yield dsn


def empty_queue(dsn: str) -> None:
    """Remove every entry and node row: each test starts from an empty queue."""
    conns = Connections(dsn)
    conns.run(lambda c: c.execute("TRUNCATE queue_entries, queue_nodes CASCADE"))
    conns.close()
