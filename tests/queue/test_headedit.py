"""ISpoolFile.remove_headers: header fields dropped before the commit, for a message in
memory and for one spilled to queue/tmp/ (rewritten on the spool's thread)."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer

from mta.crypto.keys import Keyring
from mta.headers import HeaderMatch
from mta.queue import entry as fmt
from mta.queue.spool import Spool
from mta.testing import FakeSpool
from tests.queue.doubles import InlinePool, ManualPool, ThreadClock, envelope

FORGED = b"Authentication-Results: mx.example.test; dmarc=pass\r\n"
MATCH = (HeaderMatch("Authentication-Results", r"mx\.example\.test(?![\w.-])"),)
HEAD = b"From: a@example.test\r\n" + FORGED + b"Subject: hi\r\n" + FORGED + b"\r\n"


def spool_for(tmp_path, pool=None, **kw):
    return Spool(str(tmp_path / "queue"), ThreadClock(), pool or InlinePool(), **kw)


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def committed(spool, qid) -> bytes:
    entry = fmt.read_entry(spool.active_path(qid))
    with open(spool.active_path(qid), "rb") as f:
        return f.read(entry.body_length)


def test_in_memory(tmp_path):
    spool = spool_for(tmp_path)
    body = HEAD + b"Authentication-Results: mx.example.test; in the body\r\n"
    f = spool.open("Q1")
    f.write(body[:30])
    f.write(body[30:])
    assert not f.spilled
    assert result_of(f.remove_headers(MATCH)) == 2
    expected = b"From: a@example.test\r\nSubject: hi\r\n\r\n" + body[len(HEAD) :]
    assert f.size == len(expected)
    assert result_of(f.commit(envelope("b@example.test"))) == "Q1"
    assert committed(spool, "Q1") == expected


def test_spilled_is_rewritten(tmp_path):
    spool = spool_for(tmp_path, memory_limit=1024)
    tail = b"".join(b"line %06d of the body\r\n" % i for i in range(20000))
    f = spool.open("Q2")
    f.write(HEAD)
    for i in range(0, len(tail), 4096):
        f.write(tail[i : i + 4096])
    assert f.spilled
    assert result_of(f.remove_headers(MATCH)) == 2
    assert os.listdir(spool.tmp_dir) == ["Q2"]  # no .edit file left behind
    f.write(b"")  # nothing more comes; the commit appends the trailer at the end
    assert result_of(f.commit(envelope("b@example.test"))) == "Q2"
    assert committed(spool, "Q2") == b"From: a@example.test\r\nSubject: hi\r\n\r\n" + tail


@pytest.mark.parametrize("size", [100, 70000, 300000])
def test_sealed_spill_is_rewritten_sealed(tmp_path, size):
    """With [queue] encrypt the spill file is sealed: the rewrite reads it in clear
    and seals it again; the committed entry reads back exactly, edited."""
    keyring = Keyring.of(bytes(range(32)))
    spool = spool_for(tmp_path, memory_limit=64, keyring=keyring)
    tail = b"SECRET " * (size // 7) + b"\r\n"
    f = spool.open("Q6")
    f.write(HEAD)
    for i in range(0, len(tail), 5000):
        f.write(tail[i : i + 5000])
    assert f.spilled
    assert result_of(f.remove_headers(MATCH)) == 2
    assert b"SECRET" not in open(spool.tmp_path("Q6"), "rb").read()
    assert result_of(f.commit(envelope("b@example.test"), b"Received: x\r\n")) == "Q6"
    entry = fmt.read_entry(spool.active_path("Q6"), keyring=keyring)
    expected = b"From: a@example.test\r\nSubject: hi\r\n\r\n" + tail
    assert entry.body_length == len(expected)
    assert b"".join(entry.body.chunks()) == b"Received: x\r\n" + expected


def test_nothing_to_remove_leaves_the_file_alone(tmp_path):
    spool = spool_for(tmp_path, memory_limit=16)
    f = spool.open("Q3")
    f.write(b"Subject: hi\r\n\r\n" + b"x" * 100)
    before = os.stat(spool.tmp_path("Q3")).st_ino
    assert result_of(f.remove_headers(MATCH)) == 0
    assert os.stat(spool.tmp_path("Q3")).st_ino == before
    result_of(f.commit(envelope("b@example.test")))
    assert committed(spool, "Q3") == b"Subject: hi\r\n\r\n" + b"x" * 100


def test_abort_while_rewriting(tmp_path):
    pool = ManualPool()
    spool = spool_for(tmp_path, pool, memory_limit=16)
    f = spool.open("Q4")
    f.write(HEAD + b"body " * 100)
    d = f.remove_headers(MATCH)
    with pytest.raises(ValueError):
        f.commit(envelope("b@example.test"))  # not while the thread works
    f.abort()
    pool.run_all()
    assert result_of(d) == 2
    assert os.listdir(spool.tmp_dir) == []


def test_fake_spool_file_removes_too():
    spool = FakeSpool()
    f = spool.open("Q5")
    f.write(HEAD + b"body\r\n")
    assert result_of(f.remove_headers(MATCH)) == 2
    result_of(f.commit(envelope("b@example.test"), b""))
    assert spool.committed[0].body == b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
