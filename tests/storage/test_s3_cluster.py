"""The S3 store in a cluster: its index in the PostgreSQL of ``[database] dsn``, which
every node shares, with the bucket.

Two "nodes" are two `S3Store` instances with datadirs of their own, one dsn, one
bucket and prefix: what one delivers the other lists, reads, searches, deletes and
recognises (`has_delivered`, the dedup after a lease expiry); quotas agree; two
nodes deleting the last two rows of one object at once leave no object behind; and
``open_store`` puts the index there when ``[database] dsn`` names PostgreSQL.
Real SeaweedFS, real PostgreSQL.
"""

from __future__ import annotations

import threading
import time

import pytest

from mta.config import build_config
from mta.db import Database, SchemaError
from mta.envelope import Address
from mta.storage import StoreItem, open_store
from mta.storage.quota import QuotaStore
from mta.storage.s3store import S3Store
from mta.testing import MemoryBody
from tests.s3server import ACCESS_KEY, SECRET_KEY
from tests.storage.conftest import S3_BUCKET, s3_prefix

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")
MESSAGE = (
    b"Message-ID: <cluster-1@remote.test>\r\nFrom: Alice <alice@remote.test>\r\n"
    b"Subject: lighthouse keeper rota\r\n\r\nnode a wrote this\r\n"
)
WAIT = 30.0  # seconds a test waits for another thread to reach a state


def prefix_for(box: Address) -> bytes:
    return f"Return-Path: <alice@remote.test>\r\nDelivered-To: {box}\r\n".encode()


def items_for(body, *boxes, tag="00cd", check_existing=False):
    return [
        StoreItem(box, f"{tag}-{i}", prefix_for(box), body, check_existing)
        for i, box in enumerate(boxes)
    ]


@pytest.fixture
def nodes(s3_store_factory, postgres_dsn, tmp_path):
    """(node_a, node_b): two S3 stores, datadirs a/ and b/, one dsn and prefix."""
    prefix = s3_prefix(tmp_path)
    made = []
    for name in ("a", "b"):
        root = tmp_path / name
        root.mkdir()
        made.append(s3_store_factory(root, index=postgres_dsn, prefix=prefix))
    yield tuple(made)
    for store in made:
        store.close()


def keys_of(store: S3Store) -> list[str]:
    return store.call(store.client.list_keys, store.prefix)


def test_what_one_node_delivers_the_other_reads_searches_and_deletes(nodes, tmp_path):
    a, b = nodes
    outcomes = a.deliver_batch(items_for(MemoryBody(MESSAGE), BOB, CAROL))
    assert all(isinstance(o, str) for o in outcomes), outcomes
    [key] = keys_of(a)
    # Node B sees A's delivery: a queue entry A delivered before its lease expired
    # is not delivered twice.
    assert b.has_delivered(BOB, "00cd-0") and b.has_delivered(CAROL, "00cd-1")
    again = b.deliver_batch(items_for(MemoryBody(MESSAGE), BOB, CAROL, check_existing=True))
    assert again == outcomes and keys_of(b) == [key]
    for box in (BOB, CAROL):
        [msg] = b.list_messages(box)
        assert b.read_message(box, msg.message_id) == prefix_for(box) + MESSAGE
        assert msg.size == len(prefix_for(box) + MESSAGE)
    hits = b.search("lighthouse rota")
    assert sorted(h.user for h in hits) == ["bob@example.test", "carol@example.test"]
    assert hits[0].subject == "lighthouse keeper rota"
    # B deletes: the object stays while A's other row needs it, then goes.
    b.delete_message(BOB, b.list_messages(BOB)[0].message_id)
    assert a.list_messages(BOB) == [] and not a.has_delivered(BOB, "00cd-0")
    assert keys_of(a) == [key]
    [carols] = a.list_messages(CAROL)
    assert a.read_message(CAROL, carols.message_id) == prefix_for(CAROL) + MESSAGE
    assert b.remove_mailbox(CAROL) is True
    assert keys_of(a) == [] and a.list_messages(CAROL) == []
    # Neither node made an SQLite index of its own.
    assert not list(tmp_path.glob("*/mta.db*"))


def test_quotas_agree_between_nodes(nodes, postgres_dsn):
    a, b = nodes
    with Database(postgres_dsn) as db:
        db.add_user("bob@example.test", quota_mb=1)
        quota_a, quota_b = QuotaStore(a, lambda: db), QuotaStore(b, lambda: db)
        [where] = quota_a.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
        size = len(prefix_for(BOB) + MESSAGE)
        assert where.startswith("s3:") and db.quota_usage(["bob@example.test"]) == {
            "bob@example.test": (1 << 20, size)
        }
        assert quota_b.recount(BOB) == size
        quota_b.delete_message(BOB, where)
        assert db.quota_usage(["bob@example.test"])["bob@example.test"][1] == 0
        assert quota_a.recount(BOB) == 0


def _waiting_on_a_lock(dsn: str, application: str) -> bool:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database() AND application_name = %s",
            (application,),
        ).fetchone()
    return row[0] > 0


def test_two_nodes_deleting_an_objects_last_rows_at_once_delete_it(nodes, postgres_dsn):
    """Node A is inside its deletion of Bob's row (here: a transaction holding the
    object's rows, as `ObjectIndex.delete` does, Bob's row deleted, not committed)
    when node B deletes Carol's: B waits for A, then sees it holds the last row and
    deletes the object.  Without the row locks each would see the other's row and
    the object would stay forever."""
    import psycopg

    a, b = nodes
    a.deliver_batch(items_for(MemoryBody(MESSAGE), BOB, CAROL))
    [key] = keys_of(a)
    bob_id = int(a.list_messages(BOB)[0].message_id)
    carol_id = b.list_messages(CAROL)[0].message_id
    with psycopg.connect(postgres_dsn) as node_a:  # a transaction, committed on exit
        locked = node_a.execute(
            "SELECT id FROM messages WHERE object_key = %s ORDER BY id FOR UPDATE", (key,)
        ).fetchall()
        assert len(locked) == 2
        node_a.execute("DELETE FROM messages WHERE id = %s", (bob_id,))
        done = threading.Event()
        errors = []

        def delete_on_b():
            try:
                b.delete_message(CAROL, carol_id)
            except Exception as e:  # noqa: BLE001 (reported by the test)
                errors.append(e)
            done.set()

        threading.Thread(target=delete_on_b, daemon=True).start()
        deadline = time.monotonic() + WAIT
        while not _waiting_on_a_lock(postgres_dsn, "mta") and not done.is_set():
            assert time.monotonic() < deadline, "node B never waited for node A"
            time.sleep(0.01)  # polling PostgreSQL's view of B, not timing B
        assert not done.is_set(), "node B deleted without waiting for node A's rows"
    assert done.wait(WAIT) and errors == []
    assert keys_of(a) == []
    assert a.list_messages(BOB) == [] and a.list_messages(CAROL) == []


def _config(root, dsn: str, endpoint: str, prefix: str, migrate: str = "auto"):
    secret = root / "s3.secret"
    secret.write_text(SECRET_KEY + "\n")
    secret.chmod(0o600)
    data = {
        "datadir": str(root / "data"),
        "local_domains": ["example.test"],
        "postmaster": "bob@example.test",
        "database": {"dsn": dsn, "migrate": migrate},
        "storage": {
            "backend": "s3",
            "s3": {
                "endpoint": endpoint,
                "bucket": S3_BUCKET,
                "prefix": prefix,
                "access_key_id": ACCESS_KEY,
                "secret_access_key_file": str(secret),
            },
        },
    }
    return build_config(data, source=str(root / "mta.toml"))


def test_open_store_keeps_the_index_in_the_configured_postgresql(s3_server, postgres_dsn, tmp_path):
    prefix = s3_prefix(tmp_path)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    one = open_store(_config(roots[0], postgres_dsn, s3_server.endpoint, prefix))
    two = open_store(_config(roots[1], postgres_dsn, s3_server.endpoint, prefix))
    try:
        assert one.index.location == postgres_dsn
        [where] = one.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
        assert two.read_message(BOB, where) == prefix_for(BOB) + MESSAGE
        assert not list(tmp_path.glob("*/data/mta.db*"))
    finally:
        one.close()
        two.close()


def test_a_schema_that_is_behind_is_refused_with_migrate_manual(s3_server, postgres_dsn, tmp_path):
    config = _config(tmp_path, postgres_dsn, s3_server.endpoint, s3_prefix(tmp_path), "manual")
    store = open_store(config)
    try:
        with pytest.raises(SchemaError, match="mta-admin db migrate"):
            store.list_messages(BOB)
    finally:
        store.close()
