"""Spool: durable commit, group commit, spill, abort, recovery."""

from __future__ import annotations

import os

import pytest
from zope.interface.verify import verifyObject

from mta.interfaces import ISpool, ISpoolFile
from mta.queue import entry as fmt
from mta.queue.spool import MEMORY_LIMIT, Spool, new_queue_id
from tests.queue.doubles import FsyncCounter, InlinePool, ManualPool, ThreadClock, envelope


@pytest.fixture
def clock():
    return ThreadClock()


def make_spool(tmp_path, clock, pool=None, **kw):
    return Spool(str(tmp_path / "queue"), clock, pool or InlinePool(), **kw)


def commit(spool, body=b"Subject: hi\r\n\r\nhello\r\n", env=None, trace=b"Received: from x\r\n"):
    qid = spool.new_queue_id()
    f = spool.open(qid)
    f.write(body)
    return qid, f.commit(env or envelope("bob@example.test"), trace)


def test_interfaces(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    assert verifyObject(ISpool, spool)
    assert verifyObject(ISpoolFile, spool.open(spool.new_queue_id()))


def test_commit_is_durable_and_readable(tmp_path, clock):
    fsync = FsyncCounter()
    spool = make_spool(tmp_path, clock, fsync=fsync)
    seen = []
    spool.on_commit = seen.append
    env = envelope("bob@example.test", "carol@example.test", received_at=1000.0)
    qid, d = commit(spool, env=env)
    results = []
    d.addCallback(results.append)
    assert results == [qid]
    assert (fsync.files, fsync.dirs) == (1, 1)
    assert os.listdir(spool.tmp_dir) == []
    assert os.listdir(spool.active_dir) == [qid]
    loaded = fmt.read_entry(spool.active_path(qid))
    assert loaded.envelope == env
    assert loaded.trace_headers == b"Received: from x\r\n"
    assert loaded.body_length == len(b"Subject: hi\r\n\r\nhello\r\n")
    with open(spool.active_path(qid), "rb") as f:
        assert f.read(loaded.body_length) == b"Subject: hi\r\n\r\nhello\r\n"
    [entry] = seen
    assert entry.qid == qid and entry.envelope == env and entry.created == 1000.0
    assert spool.backlog() == 1


def test_metadata_is_versioned_json(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    qid, _ = commit(spool)
    data = open(spool.active_path(qid), "rb").read()
    assert b'"version":1' in data and b'"qid":"%s"' % qid.encode() in data
    assert b"pickle" not in data


def test_group_commit_batches_waiting_commits(tmp_path, clock):
    pool = ManualPool()
    fsync = FsyncCounter()
    spool = make_spool(tmp_path, clock, pool, fsync=fsync, lanes=1)
    fired = []
    first, d1 = commit(spool)
    d1.addCallback(fired.append)
    assert len(pool.queue) == 1  # the first batch is in the "thread"
    others = []
    for _ in range(4):
        qid, d = commit(spool)
        d.addCallback(fired.append)
        others.append(qid)
    assert len(pool.queue) == 1  # nothing new submitted while a batch runs
    pool.run_one()
    assert fired == [first]
    assert len(pool.queue) == 1  # the four waiting commits form ONE batch
    pool.run_one()
    assert fired == [first, *others]
    assert spool.commit_batches == 2
    assert fsync.files == 5
    assert fsync.dirs == 2  # one directory fsync per batch
    assert sorted(os.listdir(spool.active_dir)) == sorted([first, *others])


def test_commit_failure_is_reported_and_leaves_nothing(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    os.rmdir(spool.active_dir)  # the rename will fail
    _, d = commit(spool)
    failures = []
    d.addErrback(failures.append)
    assert failures and isinstance(failures[0].value, OSError)
    assert os.listdir(spool.tmp_dir) == []
    assert spool.backlog() == 0


def test_directory_fsync_failure_takes_files_back(tmp_path, clock):
    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error")

    spool = make_spool(tmp_path, clock, fsync=fsync)
    _, d = commit(spool)
    failures = []
    d.addErrback(failures.append)
    assert failures
    assert os.listdir(spool.active_dir) == []


def test_abort_leaves_nothing(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    small = spool.open(spool.new_queue_id())
    small.write(b"x" * 100)
    small.abort()
    big = spool.open(spool.new_queue_id())
    big.write(b"x" * (MEMORY_LIMIT + 1))
    assert big.spilled and os.listdir(spool.tmp_dir)
    big.abort()
    assert os.listdir(spool.tmp_dir) == []
    assert os.listdir(spool.active_dir) == []
    assert spool.backlog() == 0


def test_large_body_spills_and_memory_stays_bounded(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    qid = spool.new_queue_id()
    f = spool.open(qid)
    chunk = bytes(range(256)) * 256  # 64 KB
    total = 20 * 1024 * 1024
    for _ in range(total // len(chunk)):
        f.write(chunk)
        assert f.buffered <= MEMORY_LIMIT
    assert f.spilled and f.size == total
    done = []
    f.commit(envelope("bob@example.test"), b"Received: x\r\n").addCallback(done.append)
    assert done == [qid]
    entry = fmt.read_entry(spool.active_path(qid))
    assert entry.body_length == total
    with open(spool.active_path(qid), "rb") as fh:
        fh.seek(total - len(chunk))
        assert fh.read(len(chunk)) == chunk
    assert os.listdir(spool.tmp_dir) == []


def test_recovery_deletes_incomplete_and_finds_committed(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    committed, _ = commit(spool)
    crashed = spool.open(spool.new_queue_id())
    crashed.write(b"y" * (MEMORY_LIMIT + 10))  # spilled to tmp/, never committed
    with open(os.path.join(spool.tmp_dir, "junk"), "wb") as fh:
        fh.write(b"half a message")

    restarted = make_spool(tmp_path, clock)  # "after a crash"
    found = []
    restarted.recover().addCallback(found.append)
    assert found == [[(0.0, committed)]]
    assert os.listdir(restarted.tmp_dir) == []
    assert restarted.backlog() == 1


def test_recovery_keeps_tmp_files_being_written(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    live = spool.open(spool.new_queue_id())
    live.write(b"z" * (MEMORY_LIMIT + 10))
    spool.recover()
    assert os.listdir(spool.tmp_dir) == [live.qid]
    live.abort()


def test_recovery_reads_next_attempt_from_status(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append
    qid, _ = commit(spool)
    entries[0].attempts = 1
    entries[0].next_attempt = 500.0
    spool.record(entries[0])
    found = []
    make_spool(tmp_path, clock).recover().addCallback(found.append)
    assert found == [[(500.0, qid)]]


def test_load_moves_corrupt_file_to_dead(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    qid, _ = commit(spool)
    path = spool.active_path(qid)
    os.truncate(path, os.path.getsize(path) - 3)
    loaded = []
    spool.load(qid).addCallback(loaded.append)
    assert loaded == [None]
    assert os.listdir(spool.active_dir) == []
    assert qid in os.listdir(spool.dead_dir)
    assert b"corrupt" in open(os.path.join(spool.dead_dir, qid + ".status"), "rb").read()


def test_finish_and_bury(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append
    commit(spool)
    commit(spool)
    done, dead = entries
    spool.finish(done)
    spool.bury(dead, "550 5.1.1 no such user")
    assert os.listdir(spool.active_dir) == []
    assert sorted(os.listdir(spool.dead_dir)) == [dead.qid, dead.qid + ".status"]
    status = fmt.read_status(os.path.join(spool.dead_dir, dead.qid + ".status"))
    assert status["reason"] == "550 5.1.1 no such user"
    assert spool.backlog() == 0


def test_group_commit_with_two_lanes(tmp_path, clock):
    pool = ManualPool()
    fsync = FsyncCounter()
    spool = make_spool(tmp_path, clock, pool, fsync=fsync, lanes=2)
    fired = []
    for _ in range(6):
        commit(spool)[1].addCallback(fired.append)
    assert len(pool.queue) == 2  # two single commits started, four waiting
    pool.run_one()
    assert len(fired) == 1 and len(pool.queue) == 2  # the four go as one batch
    pool.run_all()
    assert len(fired) == 6
    assert spool.commit_batches == 3 and fsync.dirs == 3


def test_queue_ids_unique_and_sortable():
    ids = [new_queue_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(fmt.is_queue_id(i) for i in ids)


def test_recovery_keeps_files_of_commits_in_flight(tmp_path, clock):
    pool = ManualPool()
    spool = make_spool(tmp_path, clock, pool, lanes=1)
    qid, d = commit(spool)  # small body: its tmp file is created by the commit thread
    spool.recover()
    # Pretend the commit thread got as far as creating the file when the scan runs.
    open(spool.tmp_path(qid), "wb").close()
    commit_job, scan_job = pool.queue
    pool.queue = [scan_job]
    pool.run_one()
    assert os.listdir(spool.tmp_dir) == [qid]
    os.unlink(spool.tmp_path(qid))
    pool.queue = [commit_job]
    pool.run_one()
    assert os.listdir(spool.active_dir) == [qid]


def test_finished_files_are_recycled_without_new_inodes(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append
    long_body = b"Subject: long\r\n\r\n" + b"x" * 10000 + b"\r\n"
    qid1, _ = commit(spool, body=long_body)
    inode = os.stat(spool.active_path(qid1)).st_ino
    spool.finish(entries[0])
    assert os.listdir(spool.active_dir) == []
    assert os.listdir(spool.free_dir) == [qid1]
    # The next, shorter message reuses the same inode and holds exactly its bytes.
    qid2, _ = commit(spool, body=b"Subject: short\r\n\r\nhi\r\n")
    assert os.listdir(spool.free_dir) == []
    path = spool.active_path(qid2)
    assert os.stat(path).st_ino == inode
    loaded = fmt.read_entry(path)
    assert loaded.qid == qid2
    with open(path, "rb") as f:
        assert f.read(loaded.body_length) == b"Subject: short\r\n\r\nhi\r\n"
        assert b"x" * 100 not in f.read()


def test_recovery_adopts_free_files_and_never_queues_them(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append
    qid, _ = commit(spool)
    spool.finish(entries[0])
    again = make_spool(tmp_path, clock)
    found = []
    again.recover().addCallback(found.extend)
    assert found == []
    qid2, _ = commit(again)
    assert os.stat(again.active_path(qid2)).st_size > 0
    assert os.listdir(again.free_dir) == []


def test_dsn_fields_survive_the_queue_file(tmp_path, clock):
    import attrs

    spool = make_spool(tmp_path, clock)
    env = attrs.evolve(
        envelope("bob@example.test", "carol@example.test"),
        dsn_ret="HDRS",
        dsn_envid="env-1",
        dsn_notify=("SUCCESS,FAILURE", ""),
        dsn_orcpt=("rfc822;bob@example.test", ""),
    )
    qid, _ = commit(spool, env=env)
    assert fmt.read_entry(spool.active_path(qid)).envelope == env


def test_a_small_body_is_handed_on_in_memory_a_spilled_one_is_not(tmp_path, clock):
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append
    body = b"Subject: hi\r\n\r\nhello\r\n"
    commit(spool, body=body)
    small = entries[-1]
    assert small.body.in_memory
    assert b"".join(small.body.chunks()) == b"Received: from x\r\n" + body
    assert small.file_size == os.stat(small.path).st_size
    qid = spool.new_queue_id()
    f = spool.open(qid)
    for _ in range(5):
        f.write(b"x" * MEMORY_LIMIT)
    f.commit(envelope("bob@example.test"))
    big = entries[-1]
    assert not big.body.in_memory and big.file_size == os.stat(big.path).st_size
    assert b"".join(big.body.chunks()) == b"x" * 5 * MEMORY_LIMIT
    spool.finish(small)
    assert not small.body.in_memory, "a finished entry lets go of its body"


def test_reusing_a_file_truncates_only_when_it_is_longer(tmp_path, clock, monkeypatch):
    truncates = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (truncates.append(n), real(fd, n)))
    spool = make_spool(tmp_path, clock)
    entries = []
    spool.on_commit = entries.append

    def cycle(body):
        qid, _ = commit(spool, body=body)
        loaded = fmt.read_entry(spool.active_path(qid))  # the footer must end the file
        with open(spool.active_path(qid), "rb") as f:
            assert f.read(loaded.body_length) == body
        spool.finish(entries[-1])

    cycle(b"Subject: a\r\n\r\n" + b"a" * 500 + b"\r\n")
    cycle(b"Subject: b\r\n\r\n" + b"b" * 500 + b"\r\n")  # same size: overwritten in place
    assert truncates == []
    cycle(b"Subject: c\r\n\r\n" + b"c" * 900 + b"\r\n")  # longer: no truncate needed
    assert truncates == []
    cycle(b"Subject: d\r\n\r\nd\r\n")  # shorter: cut to size
    assert len(truncates) == 1
    # After a restart the sizes of free files are unknown: always cut to size.
    again = make_spool(tmp_path, clock)
    again.recover()
    again.on_commit = entries.append
    spool = again
    cycle(b"Subject: e\r\n\r\ne\r\n")
    assert len(truncates) == 2


def test_removals_ride_along_with_the_next_commits(tmp_path, clock):
    pool = ManualPool()
    spool = make_spool(tmp_path, clock, pool=pool, lanes=1)
    entries = []
    spool.on_commit = entries.append
    commit(spool)
    pool.run_one()
    [first] = entries
    commit(spool)  # a batch is running ...
    commit(spool)
    spool.finish(first)  # ... so this removal joins the commit waiting for the next
    assert len(pool.queue) == 1
    pool.run_one()
    assert len(pool.queue) == 1, "one batch holds the third commit and the removal"
    pool.run_one()
    assert pool.queue == []
    assert sorted(os.listdir(spool.active_dir)) == sorted(e.qid for e in entries[1:])
    assert spool.commit_batches == 3


@pytest.mark.parametrize("where", ["free", "tmp"])
def test_recovery_never_reuses_or_deletes_a_second_name_of_a_queued_message(tmp_path, clock, where):
    # After a power cut without a journal, a rename's source name can survive next to
    # its destination: both names then lead to the same (acknowledged) message.
    spool = make_spool(tmp_path, clock)
    body = b"Subject: keep me\r\n\r\nacknowledged\r\n"
    qid, _ = commit(spool, body=body)
    alias = os.path.join(spool.free_dir if where == "free" else spool.tmp_dir, "ghost")
    os.link(spool.active_path(qid), alias)
    again = make_spool(tmp_path, clock)
    found = []
    again.recover().addCallback(found.extend)
    assert [q for _, q in found] == [qid]
    assert os.path.exists(alias), "deleting it could free the message's inode"
    # A new message must not be written over the queued one.
    commit(again, body=b"Subject: other\r\n\r\nnew\r\n")
    with open(again.active_path(qid), "rb") as f:
        assert f.read(len(body)) == body
    assert fmt.read_entry(again.active_path(qid)).qid == qid
