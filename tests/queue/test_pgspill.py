"""``[queue] encrypt`` on the PostgreSQL queue while a message arrives: the spill file
of a body over the memory limit is sealed as it is written, on a real PostgreSQL
and (for bodies in S3) a real S3 server (SeaweedFS).

Every file under the data directory is scanned for a marker of the body after the
spill, before the end of DATA and after the commit; the sealed segments of the
spill are what the store keeps, byte for byte (no second sealing); the message
reads back exactly; a forged Authentication-Results is removed from a sealed spill
and the rewrite is sealed too; an abort leaves no spill file; a key rotated (and
retired) while the message arrived is followed at the commit.
"""

from __future__ import annotations

import os

import pytest

from mta.crypto import stream
from mta.crypto.keys import FileKeyring, Keyring, key_id_of
from mta.headers import HeaderMatch
from mta.process.batch import BatchWorker
from mta.queue import pgseal
from mta.queue.pgbody import Places
from mta.queue.pgconn import Connections
from mta.queue.pgspool import clean_spill
from mta.queue.pgstore import PGQueueStore
from mta.queue.s3body import S3Bodies
from mta.s3.reactor import ReactorThread
from tests.queue.conftest import empty_queue
from tests.queue.doubles import InlinePool, ManualPool, ThreadClock, envelope
from tests.storage.conftest import make_client, s3_prefix, s3_server  # noqa: F401 (fixture)

MARK = b"CLEAR-IN-SPILL-7c2a"
TRACE = b"Received: from secret-host.example by mx\r\n"
FORGED = b"Authentication-Results: mx.test; dkim=pass header.d=bank.test\r\n"
HEAD = b"Subject: " + MARK + b"\r\nMessage-ID: <m@remote.test>\r\n\r\n"
LINE = MARK + b" " + b"y" * 60 + b"\r\n"
BIG = HEAD + LINE * (1024 * 1024 // len(LINE))  # ~1 MB, a marker in every line
PIECE = 16 * 1024  # what a session writes at a time
OLD_KEY, NEW_KEY = bytes(range(32)), bytes(range(1, 33))


@pytest.fixture
def datadir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def store(dsn, datadir):
    """make(places, **options) -> a store spilling to <datadir>/queue/pg-spill."""
    made = []
    empty_queue(dsn)

    def make(places, **options):
        options.setdefault("listen", False)
        options.setdefault("window", 0)
        made.append(
            PGQueueStore(
                Connections(dsn),
                ThreadClock(),
                InlinePool(),
                spill_dir=str(datadir / "queue" / "pg-spill"),
                hostname="a.test",
                node=f"a.test/1/{len(made)}",
                places=places,
                **options,
            )
        )
        return made[-1]

    yield make
    for s in made:
        s.stop()
        s.connections.close()


@pytest.fixture(params=["pg", "s3"])
def where(request, tmp_path):
    """(name, S3Bodies or None): the body goes to queue_bodies, or to S3."""
    if request.param == "pg":
        yield "pg", None
        return
    server = request.getfixturevalue("s3_server")
    thread = ReactorThread()
    client = make_client(thread.reactor, server.endpoint)
    yield "s3", S3Bodies(client, thread.call, s3_prefix(tmp_path))
    thread.stop()


def files_with(root, needle: bytes) -> list[str]:
    """Every file under `root` whose content holds `needle`."""
    found = []
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                if needle in f.read():
                    found.append(path)
    return found


def spill_files(s) -> list[str]:
    try:
        return sorted(os.listdir(s.spill_dir))
    except FileNotFoundError:
        return []


def result_of(d):
    out = []
    d.addBoth(out.append)
    [result] = out
    return result


def sql(s, query, *args):
    return s.connections.run(lambda c: c.execute(query, args).fetchall())


def stored_body(s, bodies, qid) -> bytes:
    if bodies is not None:
        return bodies.call(bodies.client.get_object, bodies.key(qid))
    rows = sql(s, "SELECT data FROM queue_bodies WHERE entry_id = %s ORDER BY seq", qid)
    return b"".join(bytes(r[0]) for r in rows)


def read_back(s, qid) -> bytes:
    out = []
    s.claim(10).addBoth(out.append)
    [[entry]] = out
    assert entry.qid == qid
    return b"".join(entry.body.chunks())


def test_a_spilled_body_is_sealed_while_it_arrives_and_stored_as_sealed(store, datadir, where):
    name, bodies = where
    ring = Keyring.of(OLD_KEY)
    s = store(Places(bodies, ring))
    f = s.open(s.new_queue_id())
    half = len(BIG) // 2 // PIECE * PIECE
    for i in range(0, half, PIECE):
        f.write(BIG[i : i + PIECE])
    assert spill_files(s) == [f.qid]  # spilled, half of the body still to come
    assert files_with(datadir, MARK) == []
    spill = os.path.join(s.spill_dir, f.qid)
    with open(spill, "rb") as fh:
        assert stream.is_sealed(fh.read(stream.HEADER_SIZE))
    for i in range(half, len(BIG), PIECE):
        f.write(BIG[i : min(i + PIECE, len(BIG))])
    body = f.body()  # end-of-message checks read it in clear
    assert body.header_block() == HEAD[:-2]
    assert b"".join(body.chunks()) == BIG
    assert files_with(datadir, MARK) == [] and files_with(datadir, b"secret-host") == []
    with open(spill, "rb") as fh:
        sealed = fh.read()
    assert len(sealed) == stream.stored_length(len(BIG))
    qid = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    assert qid == f.qid and spill_files(s) == []
    # The spill's segments are stored as they are: no second sealing.
    [(header, ref, trace)] = sql(
        s, "SELECT seal_header, body_ref, trace_headers FROM queue_entries"
    )
    assert ref == name and bytes(header) == sealed[: stream.HEADER_SIZE]
    assert stored_body(s, bodies, qid) == sealed[stream.HEADER_SIZE :]
    assert b"secret-host" not in bytes(trace)
    assert files_with(datadir, MARK) == []
    assert read_back(s, qid) == TRACE + BIG


def test_a_small_message_is_still_sealed_at_commit(store, datadir):
    ring = Keyring.of(OLD_KEY)
    s = store(Places(None, ring))
    f = s.open(s.new_queue_id())
    f.write(HEAD + LINE * 10)  # held in memory: nothing on the disk at all
    assert spill_files(s) == []
    qid = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    stored = stored_body(s, None, qid)
    assert len(stored) == pgseal.sealed_size(len(HEAD + LINE * 10)) and MARK not in stored
    assert read_back(s, qid) == TRACE + HEAD + LINE * 10


def test_a_clear_queue_spills_and_stores_in_clear(store):
    s = store(Places())
    f = s.open(s.new_queue_id())
    for i in range(0, len(BIG), PIECE):
        f.write(BIG[i : i + PIECE])
    with open(os.path.join(s.spill_dir, f.qid), "rb") as fh:
        assert fh.read(len(HEAD)) == HEAD  # no keyring: nothing to seal with
    qid = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    assert sql(s, "SELECT seal_header FROM queue_entries") == [(None,)]
    assert stored_body(s, None, qid) == BIG and read_back(s, qid) == TRACE + BIG


def test_a_forged_header_is_removed_from_a_sealed_spill(store, datadir, where):
    name, bodies = where
    ring = Keyring.of(OLD_KEY)
    s = store(Places(bodies, ring))
    message = FORGED + BIG
    f = s.open(s.new_queue_id())
    for i in range(0, len(message), PIECE):
        f.write(message[i : i + PIECE])
    spill = os.path.join(s.spill_dir, f.qid)
    before = os.stat(spill).st_ino
    removed = result_of(f.remove_headers((HeaderMatch("Authentication-Results", "mx.test"),)))
    assert removed == 1 and f.size == len(BIG)
    assert os.stat(spill).st_ino != before  # rewritten...
    assert spill_files(s) == [f.qid] and files_with(datadir, MARK) == []  # ...sealed
    assert files_with(datadir, b"bank.test") == []
    assert b"".join(f.body().chunks()) == BIG
    qid = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    assert qid == f.qid and spill_files(s) == []
    stored = stored_body(s, bodies, qid)
    assert len(stored) == pgseal.sealed_size(len(BIG)) and MARK not in stored
    assert read_back(s, qid) == TRACE + BIG


def test_an_aborted_transfer_leaves_no_spill_file(store):
    s = store(Places(None, Keyring.of(OLD_KEY)))
    f = s.open(s.new_queue_id())
    for i in range(0, len(BIG) // 2, PIECE):
        f.write(BIG[i : i + PIECE])
    assert spill_files(s) == [f.qid]
    f.abort()  # the connection dropped mid-DATA
    assert spill_files(s) == [] and sql(s, "SELECT count(*) FROM queue_entries") == [(0,)]


def test_an_abort_while_the_sealed_spill_is_rewritten_leaves_nothing(store, datadir):
    pool = ManualPool()
    s = store(Places(None, Keyring.of(OLD_KEY)))
    s._pool = pool
    f = s.open(s.new_queue_id())
    f.write(FORGED + BIG)
    d = f.remove_headers((HeaderMatch("Authentication-Results", "mx.test"),))
    f.abort()
    pool.run_all()
    assert result_of(d) == 1 and spill_files(s) == []
    assert files_with(datadir, MARK) == []


def test_a_rewrite_cut_short_by_a_crash_is_cleaned_at_start(store):
    s = store(Places(None, Keyring.of(OLD_KEY)))
    os.makedirs(s.spill_dir)
    gone = f"{0x1234567890ABC:013x}{0xFFFFFE:06x}0001beef"  # a pid above any pid_max
    mine, other = s.new_queue_id(), "not-a-queue-id"
    for name in (gone, gone + ".edit", mine, mine + ".edit", other):
        open(os.path.join(s.spill_dir, name), "wb").close()
    assert clean_spill(s.spill_dir) == 2
    assert spill_files(s) == sorted([mine, mine + ".edit", other])


def rotate(directory, new: bytes, old: bytes) -> None:
    """`mta-admin key rotate` by hand: the old key kept beside the new current one."""
    with open(os.path.join(directory, key_id_of(old) + ".key"), "wb") as fh:
        fh.write(old)
    tmp = os.path.join(directory, "master.key.new")
    with open(tmp, "wb") as fh:
        fh.write(new)
    os.replace(tmp, os.path.join(directory, "master.key"))


def spilling_under_old_key(store, keys):
    """(a store whose keyring is the file `keys`/master.key holding OLD_KEY, a spool
    file of it)."""
    keys.mkdir()
    (keys / "master.key").write_bytes(OLD_KEY)
    s = store(Places(None, FileKeyring(str(keys / "master.key"))))
    return s, s.open(s.new_queue_id())


def test_a_key_rotated_while_the_message_arrives_is_followed_at_commit(store, tmp_path):
    keys = tmp_path / "keys"
    s, f = spilling_under_old_key(store, keys)
    f.write(BIG)  # spilled, sealed under the old key
    rotate(keys, NEW_KEY, OLD_KEY)
    qid = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    [(header,)] = sql(s, "SELECT seal_header FROM queue_entries")
    assert stream.header_key_id(bytes(header)) == key_id_of(NEW_KEY)
    only_new = store(Places(None, Keyring.of(NEW_KEY)))  # the old key retired
    assert read_back(only_new, qid) == TRACE + BIG


def test_a_key_retired_while_the_message_arrives_refuses_it(store, tmp_path):
    keys = tmp_path / "keys"
    s, f = spilling_under_old_key(store, keys)
    f.write(BIG)
    rotate(keys, NEW_KEY, OLD_KEY)
    os.unlink(keys / (key_id_of(OLD_KEY) + ".key"))  # retired: nothing can read it now
    failure = result_of(f.commit(envelope("bob@remote.test"), TRACE))
    assert not isinstance(failure, str) and "wrong master key" in failure.getErrorMessage()
    assert sql(s, "SELECT count(*) FROM queue_entries") == [(0,)] and spill_files(s) == []


def test_a_sealed_spill_in_a_batch_with_small_messages(store, datadir):
    pool = ManualPool()
    s = store(Places(None, Keyring.of(OLD_KEY)))
    s._pool = pool
    s._writer = BatchWorker(s.reactor, pool, s._commit_batch)
    outcomes = []
    for message in (HEAD, BIG, HEAD + b"small\r\n"):  # the first holds the lane
        f = s.open(s.new_queue_id())
        f.write(message)
        f.commit(envelope("bob@remote.test"), TRACE).addBoth(outcomes.append)
    pool.run_one()
    assert len(pool.queue) == 1  # the spilled one and a small one: one transaction
    pool.run_all()
    assert all(isinstance(q, str) for q in outcomes) and len(outcomes) == 3
    assert spill_files(s) == [] and files_with(datadir, MARK) == []
    got = {}
    s.claim(10).addCallback(lambda es: got.update((e.qid, b"".join(e.body.chunks())) for e in es))
    pool.run_all()
    assert got == dict(zip(outcomes, (TRACE + HEAD, TRACE + BIG, TRACE + HEAD + b"small\r\n")))
