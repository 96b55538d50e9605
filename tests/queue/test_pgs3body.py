"""The PostgreSQL queue's bodies in S3 and ``[queue] encrypt`` on it, on a real
PostgreSQL and a real S3 server (SeaweedFS): the object is written before the row
commits and goes after the row, S3 down means a refusal with nothing in
PostgreSQL, a failed transaction takes its objects back, bodies read back
byte-exact in 1 MiB ranges (multipart above 8 MiB), sealed bodies and trace
headers hold no clear text wherever they are, key retire re-wraps, and orphans are
swept on an injected clock.

Each "node" is a `PGQueueStore` whose SQL runs inline (`InlinePool`); its S3
requests run on a reactor thread of the test's own.
"""

from __future__ import annotations

import os
import time

import pytest

from mta.crypto import stream
from mta.crypto.keys import DecryptionError, Keyring
from mta.process.batch import BatchWorker
from mta.queue import pgseal, pgsql
from mta.queue.control import ControlError
from mta.queue.pgbody import Places
from mta.queue.pgconn import Connections
from mta.queue.pgcontrol import PGQueueControl, hold_message
from mta.queue.pgstore import PGQueueStore
from mta.queue.s3body import ORPHAN_AGE, S3Bodies
from mta.s3.reactor import ReactorThread
from tests.conftest import free_port
from tests.queue.conftest import empty_queue
from tests.queue.doubles import InlinePool, ManualPool, ThreadClock, envelope
from tests.storage.conftest import make_client, s3_prefix, s3_server  # noqa: F401 (fixture)

MARK = b"CLEAR-TEXT-MARK-5e1d"
MESSAGE = b"Subject: " + MARK + b"\r\nMessage-ID: <m@remote.test>\r\n\r\nbody " + MARK + b"\r\n"
TRACE = b"Received: from secret-host.example by mx\r\n"
OLD_KEY, NEW_KEY = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture
def s3(s3_server, tmp_path):  # noqa: F811
    """make(endpoint=None, **client_kwargs) -> S3Bodies under a prefix of this test."""
    threads = []

    def make(endpoint=None, **kwargs):
        thread = ReactorThread()
        threads.append(thread)
        client = make_client(thread.reactor, endpoint or s3_server.endpoint, **kwargs)
        return S3Bodies(client, thread.call, s3_prefix(tmp_path))

    yield make
    for thread in threads:
        thread.stop()


@pytest.fixture
def nodes(dsn, tmp_path):
    made = []
    empty_queue(dsn)

    def make(places=None, **options):
        options.setdefault("listen", False)
        store = PGQueueStore(
            Connections(dsn),
            ThreadClock(),
            InlinePool(),
            spill_dir=str(tmp_path / "spill"),
            hostname="a.test",
            node=f"a.test/1/{len(made)}",
            places=places,
            **options,
        )
        made.append(store)
        return store

    yield make
    for store in made:
        store.stop()
        store.connections.close()


def commit(store, body=MESSAGE, trace=TRACE):
    """The queue id, or the Failure of the commit."""
    f = store.open(store.new_queue_id())
    for i in range(0, len(body), 65536):
        f.write(body[i : i + 65536])
    out = []
    f.commit(envelope("bob@remote.test"), trace).addBoth(out.append)
    [result] = out
    return result


def claimed(store):
    out = []
    store.claim(100).addBoth(out.append)
    [entries] = out
    return entries


def sql(store, query, *args):
    return store.connections.run(lambda c: c.execute(query, args).fetchall())


def keys(bodies: S3Bodies) -> list[str]:
    return bodies.call(bodies.client.list_keys, bodies.folder)


def test_a_body_goes_to_s3_before_its_row_and_leaves_after_delivery(nodes, s3):
    bodies = s3()
    store = nodes(Places(bodies), window=0)  # nothing kept in memory: read back from S3
    qid = commit(store)
    assert keys(bodies) == [bodies.folder + qid] and bodies.folder.endswith("/queue/")
    assert sql(store, "SELECT body_ref FROM queue_entries WHERE id = %s", qid) == [("s3",)]
    assert sql(store, "SELECT count(*) FROM queue_bodies") == [(0,)]
    [entry] = claimed(store)
    assert not entry.body.in_memory and entry.body.ref == "s3"
    assert b"".join(entry.body.chunks(7)) == TRACE + MESSAGE
    assert entry.body.header_block() == TRACE + MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"
    assert store.probe().endswith(f"bodies in {bodies.client.where}/{bodies.folder}")
    store.finish(entry)
    assert sql(store, "SELECT count(*) FROM queue_entries") == [(0,)]
    assert keys(bodies) == []


def test_s3_down_refuses_the_message_and_leaves_nothing_in_postgresql(nodes, s3):
    dead = f"http://127.0.0.1:{free_port()}"
    store = nodes(Places(s3(endpoint=dead, attempts=1, timeout=2.0)))
    failure = commit(store)
    assert not isinstance(failure, str)
    assert "unreachable" in failure.getErrorMessage() and dead in failure.getErrorMessage()
    assert sql(store, "SELECT count(*) FROM queue_entries") == [(0,)]
    with pytest.raises(OSError, match=f"queue bodies: s3: {dead}/mta-test unreachable"):
        store.probe()


def test_a_failed_transaction_deletes_the_objects_it_wrote(nodes, s3):
    bodies = s3()
    store = nodes(Places(bodies))
    qid = store.new_queue_id()
    # A row already holds this queue id: the INSERT fails after the PUT.
    store.connections.run(
        lambda c: c.execute(
            "INSERT INTO queue_entries (id, envelope, body_length, size, next_attempt,"
            " created, updated) VALUES (%s, '{}', 0, 0, 0, 0, 0)",
            (qid,),
        )
    )
    store.new_queue_id = lambda: qid
    failure = commit(store)
    assert not isinstance(failure, str) and "duplicate key" in failure.getErrorMessage()
    assert keys(bodies) == []


def test_a_body_s3_cannot_take_is_refused_alone_and_its_batch_commits(nodes, s3, tmp_path):
    bodies = s3()
    pool = ManualPool()
    store = nodes(Places(bodies), memory_limit=1024)
    store._pool = pool
    store._writer = BatchWorker(store.reactor, pool, store._commit_batch)
    outcomes = {}
    for name in ("first", "short", "fine"):  # "first" holds the lane: the others batch
        f = store.open(store.new_queue_id())
        f.write(MESSAGE * 100)  # spilled
        f.commit(envelope("bob@remote.test"), TRACE).addBoth(outcomes.setdefault(name, []).append)
        if name == "short":
            os.truncate(os.path.join(store.spill_dir, f.qid), 100)  # its upload fails
    pool.run_one()
    assert len(pool.queue) == 1  # "short" and "fine": one batch, one transaction
    pool.run_all()
    [short], [fine] = outcomes["short"], outcomes["fine"]
    assert not isinstance(short, str) and "shorter than recorded" in short.getErrorMessage()
    assert isinstance(fine, str) and isinstance(outcomes["first"][0], str)
    rows = {r[0] for r in sql(store, "SELECT id FROM queue_entries")}
    assert rows == {fine, outcomes["first"][0]}
    assert sorted(keys(bodies)) == sorted(bodies.key(q) for q in rows)
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_big_body_is_a_multipart_upload_read_back_in_ranges(nodes, s3, tmp_path):
    bodies = s3()
    store = nodes(Places(bodies), memory_limit=1024, window=0)
    big = b"Subject: big\r\n\r\n" + bytes(range(256)) * (9 * 4096 + 17)  # > 8 MiB
    qid = commit(store, big)
    assert isinstance(qid, str) and not list((tmp_path / "spill").iterdir())
    head = bodies.call(bodies.client.request, "HEAD", bodies.key(qid))
    assert head.headers["etag"].strip('"').endswith("-2")  # two parts
    [entry] = claimed(store)
    assert b"".join(entry.body.chunks()) == TRACE + big


def test_bodies_stay_readable_where_they_were_written(nodes, s3):
    bodies = s3()
    in_pg = commit(nodes(window=0))  # before [storage.s3] was configured
    store = nodes(Places(bodies), window=0)
    in_s3 = commit(store)
    refs = dict(sql(store, "SELECT id, body_ref FROM queue_entries"))
    assert refs == {in_pg: "pg", in_s3: "s3"}
    entries = claimed(store)
    assert {e.qid: b"".join(e.body.chunks()) for e in entries} == {
        in_pg: TRACE + MESSAGE,
        in_s3: TRACE + MESSAGE,
    }
    pg_only = nodes(window=0)  # S3 removed from the configuration: said clearly
    for e in entries:
        store.defer(e, 0)
    lost = [e for e in claimed(pg_only) if e.qid == in_s3]
    with pytest.raises(OSError, match="no \\[storage.s3\\] is configured"):
        b"".join(lost[0].body.chunks())


@pytest.mark.parametrize("where", ["pg", "s3"])
def test_sealed_bodies_and_trace_headers_hold_no_clear_text(nodes, s3, where):
    bodies = s3() if where == "s3" else None
    ring = Keyring.of(OLD_KEY)
    store = nodes(Places(bodies, ring), window=0)
    big = MESSAGE + (MARK + b" " + b"y" * 100 + b"\r\n") * 20000  # ~2.4 MB: many segments
    qid = commit(store, big)
    [(trace, header, length)] = sql(
        store, "SELECT trace_headers, seal_header, body_length FROM queue_entries"
    )
    assert stream.header_key_id(bytes(header)) == ring.current and length == len(big)
    assert b"secret-host" not in bytes(trace)
    if where == "s3":
        stored = bodies.call(bodies.client.get_object, bodies.key(qid))
        assert sql(store, "SELECT count(*) FROM queue_bodies") == [(0,)]
    else:
        stored = b"".join(
            bytes(r[0]) for r in sql(store, "SELECT data FROM queue_bodies ORDER BY seq")
        )
    assert len(stored) == pgseal.sealed_size(len(big)) and MARK not in stored
    [entry] = claimed(store)
    assert entry.trace_headers == TRACE
    assert b"".join(entry.body.chunks()) == TRACE + big
    store.defer(entry, 0)
    other = nodes(Places(bodies, Keyring.of(NEW_KEY)), window=0)
    [entry] = claimed(other)
    with pytest.raises(DecryptionError, match="wrong master key"):
        b"".join(entry.body.chunks())


def test_key_retire_rewraps_every_sealed_entry(nodes, s3, dsn):
    bodies = s3()
    old = Keyring.of(OLD_KEY)
    store = nodes(Places(bodies, old), window=0)
    qids = [commit(store, MESSAGE + b"n%d\r\n" % i) for i in range(3)]
    both = Keyring.of(NEW_KEY, OLD_KEY)  # rotated: the new key is current
    assert sql(store, "SELECT count(*) FROM queue_entries WHERE seal_header IS NULL") == [(0,)]
    count = store.connections.run(pgseal.rekey, both, old.current, True)
    assert count == 3
    assert store.connections.run(pgseal.rekey, both, old.current) == 3
    assert store.connections.run(pgseal.rekey, both, old.current) == 0
    new_only = Keyring.of(NEW_KEY)
    for (header,) in sql(store, "SELECT seal_header FROM queue_entries"):
        assert stream.header_key_id(bytes(header)) == new_only.current
    reader = nodes(Places(bodies, new_only), window=0)
    got = {e.qid: b"".join(e.body.chunks()) for e in claimed(reader)}
    assert got == {q: TRACE + MESSAGE + b"n%d\r\n" % i for i, q in enumerate(qids)}


def test_control_shows_holds_and_deletes_s3_bodies(nodes, s3, dsn):
    bodies = s3()
    ring = Keyring.of(OLD_KEY)
    places = Places(bodies, ring)
    qid = hold_message(dsn, envelope("eve@remote.test"), MESSAGE, TRACE, places)
    assert keys(bodies) == [bodies.key(qid)]
    control = PGQueueControl(dsn, places=places)
    try:
        shown = control.show(qid)
        assert "Place:      hold" in shown and f"Subject: {MARK.decode()}" in shown
        assert "secret-host.example" in shown
        assert control.act("release", qid) == f"{qid} released"
        store = nodes(places)
        store.reactor.advance(time.time() + 1)  # released "now" on the wall clock
        [entry] = claimed(store)
        assert b"".join(entry.body.chunks()) == TRACE + MESSAGE
        store.defer(entry, 0)
        assert control.act("delete", qid).startswith(f"{qid} deleted")
        assert keys(bodies) == []
        blind = PGQueueControl(dsn, places=Places(bodies))  # no keyring
        other = hold_message(dsn, envelope("eve@remote.test"), MESSAGE, TRACE, places)
        with pytest.raises(ControlError, match="encrypted"):
            blind.show(other)
        blind.close()
    finally:
        control.close()


def test_the_sweep_removes_old_objects_without_a_row(nodes, s3):
    bodies = s3()
    store = nodes(Places(bodies), window=0)
    kept = commit(store)
    orphan = store.new_queue_id()
    bodies.call(bodies.client.put_object, bodies.key(orphan), b"left by a crash")
    bodies.call(bodies.client.put_object, bodies.folder + "not-a-queue-id", b"x")
    [(_, written), *_] = bodies.call(bodies.client.list_page, bodies.folder)[0]

    def live(qids):
        return store.connections.run(pgsql.existing, qids)

    assert bodies.sweep(live, written + 60) == 0  # young: may be a commit in flight
    assert len(keys(bodies)) == 3
    assert bodies.sweep(live, written + ORPHAN_AGE + 60) == 1
    assert sorted(keys(bodies)) == sorted([bodies.key(kept), bodies.folder + "not-a-queue-id"])
    # The store runs it at start and then hourly, on its clock.
    bodies.call(bodies.client.put_object, bodies.key(orphan), b"again")
    store.reactor.advance(written + 2 * ORPHAN_AGE - store.reactor.seconds())
    store.startService()
    assert bodies.key(orphan) not in keys(bodies)
    bodies.call(bodies.client.put_object, bodies.key(orphan), b"again")
    store.reactor.advance(ORPHAN_AGE)  # an hour later: swept again
    assert bodies.key(orphan) not in keys(bodies)
    store.stopService()


def queue_config(tmp_path, dsn, s3=None, **queue):
    from mta.config import build_config

    (tmp_path / "master.key").write_bytes(OLD_KEY)
    data = {
        "datadir": str(tmp_path / "data"),
        "local_domains": ["example.test"],
        "postmaster": "bob@example.test",
        "queue": {"backend": "postgresql", "dsn": dsn, **queue},
        "storage": {"master_key_file": str(tmp_path / "master.key")},
    }
    if s3 is not None:
        data["storage"]["s3"] = s3
    return build_config(data, source=str(tmp_path / "mta.toml"))


def test_the_configured_store_seals_and_uses_s3_beside_maildir(
    tmp_path,
    dsn,
    nodes,
    s3_server,  # noqa: F811
):
    from mta.config import ConfigError
    from mta.queue import open_queue_store
    from mta.queue.pgopen import open_places
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    with pytest.raises(ConfigError, match="storage.s3.bucket"):
        queue_config(tmp_path, dsn, {"endpoint": s3_server.endpoint})
    (tmp_path / "s3.secret").write_text(SECRET_KEY)
    table = {
        "endpoint": s3_server.endpoint,
        "bucket": "mta-test",
        "access_key_id": ACCESS_KEY,
        "secret_access_key_file": str(tmp_path / "s3.secret"),
        "prefix": s3_prefix(tmp_path),
    }
    config = queue_config(tmp_path, dsn, table, encrypt=True)
    assert config.storage.backend == "maildir"
    store = open_queue_store(config, ThreadClock(), InlinePool())
    places = store.bodies
    assert places.keyring is not None  # [queue] encrypt was ignored here before
    assert places.s3.folder == s3_prefix(tmp_path) + "queue/"
    assert places.s3.client.where == f"{s3_server.endpoint}/mta-test"
    store.connections.close()
    # The same places, their requests on a reactor thread (the test has no reactor).
    places = open_places(config, places.keyring)
    store = nodes(places)
    try:
        qid = commit(store)
        stored = places.s3.call(places.s3.client.get_object, places.s3.key(qid))
        assert MARK not in stored and len(stored) == pgseal.sealed_size(len(MESSAGE))
        [entry] = claimed(store)
        assert b"".join(entry.body.chunks()) == TRACE + MESSAGE
    finally:
        places.close()
    plain = open_queue_store(queue_config(tmp_path, dsn), ThreadClock(), InlinePool())
    assert plain.bodies.s3 is None and plain.bodies.keyring is None
    plain.connections.close()


def test_key_retire_through_the_queue_facade(tmp_path, dsn, nodes):
    from mta.queue import rekey_queue

    config = queue_config(tmp_path, dsn, encrypt=True)
    store = nodes(Places(None, Keyring.of(OLD_KEY)), window=0)
    qid = commit(store)
    both = Keyring.of(NEW_KEY, OLD_KEY)
    old_id = Keyring.of(OLD_KEY).current
    assert rekey_queue(config, both, old_id, dry_run=True) == (1, 0)
    assert rekey_queue(config, both, old_id) == (1, 0)
    [entry] = claimed(nodes(Places(None, Keyring.of(NEW_KEY)), window=0))
    assert entry.qid == qid and b"".join(entry.body.chunks()) == TRACE + MESSAGE
