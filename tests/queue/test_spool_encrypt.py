"""`[queue] encrypt`: nothing of a message reaches the spool's disk in clear, and
what is there reads back only with the right key, unaltered, in its own file."""

from __future__ import annotations

import os

import pytest

from mta.crypto import stream
from mta.crypto.keys import DecryptionError, Keyring
from mta.queue import entry as fmt
from mta.queue import files
from mta.queue.control import ControlError, describe
from mta.queue.inject import hold_message
from mta.queue.spool import Spool
from tests.queue.doubles import InlinePool, ThreadClock, envelope

MARK = b"SECRET-PAYLOAD-7f3a"
TRACE = b"Received: from trace-host.example ([198.51.100.9]) by mx\r\n"
KEY = bytes(range(32))


@pytest.fixture
def keyring():
    return Keyring.of(KEY)


@pytest.fixture
def spool(tmp_path, keyring):
    return Spool(str(tmp_path / "queue"), ThreadClock(), InlinePool(), keyring=keyring)


def message(size: int) -> bytes:
    head = b"Subject: " + MARK + b"\r\n\r\n"
    line = MARK + b" " + b"x" * 60 + b"\r\n"
    body = head + line * (max(0, size - len(head)) // len(line) + 1)
    return body[:size]


def receive(spool, data: bytes, piece: int = 8192):
    qid = spool.new_queue_id()
    f = spool.open(qid)
    for i in range(0, len(data), piece):
        f.write(data[i : i + piece])
    return qid, f


def committed(spool, data: bytes, **kw) -> str:
    qid, f = receive(spool, data, **kw)
    out = []
    f.commit(envelope("bob@example.test"), TRACE).addCallback(out.append)
    assert out == [qid]
    return qid


def disk_bytes(root) -> bytes:
    out = []
    for base, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(base, name), "rb") as f:
                out.append(f.read())
    return b"".join(out)


@pytest.mark.parametrize(
    "size",
    [0, 100, stream.SEGMENT - 1, stream.SEGMENT, 300 * 1024, 4 * stream.SEGMENT, 1_000_003],
)
def test_sealed_message_reads_back_exactly(spool, keyring, size):
    data = message(size)
    qid = committed(spool, data)
    raw = open(spool.active_path(qid), "rb").read()
    assert MARK not in raw and b"198.51.100.9" not in raw
    entry = fmt.read_entry(spool.active_path(qid), keyring=keyring)
    assert entry.body_length == size
    assert entry.stored_length == stream.stored_length(size)
    assert entry.trace_headers == TRACE
    assert b"".join(entry.body.chunks()) == TRACE + data
    out = spool.tmp_dir + "/copy"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert entry.body.copy_into(fd, b"X-Pre: 1\r\n") == 10 + len(TRACE) + size
    finally:
        os.close(fd)
    assert open(out, "rb").read() == b"X-Pre: 1\r\n" + TRACE + data
    if size:
        assert entry.body.header_block() == TRACE + b"Subject: " + MARK + b"\r\n"


def test_the_committed_entry_reads_its_file_once_memory_is_dropped(spool, keyring):
    seen = []
    spool.on_commit = seen.append
    data = message(5000)
    committed(spool, data)
    [entry] = seen
    assert entry.body.in_memory
    entry.body.forget_memory()
    assert b"".join(entry.body.chunks()) == TRACE + data


def test_a_spilled_body_is_sealed_while_it_arrives(spool, keyring):
    data = message(2_000_000)
    qid, f = receive(spool, data[:1_500_000])
    assert f.spilled
    assert MARK not in disk_bytes(spool.queue_dir)  # nothing in clear, not even in tmp/
    f.write(data[1_500_000:])
    body = f.body()  # the end-of-DATA checks read it back, decrypted
    assert body.size == len(data)
    assert b"".join(body.chunks()) == data
    with pytest.raises(ValueError):
        f.write(b"more")  # the end is sealed: nothing may follow
    out = []
    f.commit(envelope("bob@example.test"), TRACE).addCallback(out.append)
    assert out == [qid]
    assert MARK not in disk_bytes(spool.queue_dir)
    entry = fmt.read_entry(spool.active_path(qid), keyring=keyring)
    assert b"".join(entry.body.chunks()) == TRACE + data


def test_an_aborted_spill_leaves_nothing(spool):
    _, f = receive(spool, message(600_000))
    f.abort()
    assert os.listdir(spool.tmp_dir) == []


def test_wrong_key_is_a_clear_error(spool):
    qid = committed(spool, message(1000))
    other = Keyring.of(os.urandom(32))
    with pytest.raises(DecryptionError, match="wrong master key for key id"):
        fmt.read_entry(spool.active_path(qid), keyring=other)


def test_an_altered_segment_does_not_authenticate(spool, keyring):
    qid = committed(spool, message(200_000))
    path = spool.active_path(qid)
    with open(path, "r+b") as f:
        f.seek(stream.HEADER_SIZE + stream.SEGMENT + 100)  # inside segment 1
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    entry = fmt.read_entry(path, keyring=keyring)
    with pytest.raises(DecryptionError, match="segment 1 does not authenticate"):
        b"".join(entry.body.chunks())


def test_a_body_moved_into_another_queue_file_does_not_decrypt(spool, keyring):
    a = committed(spool, message(3000))
    b = committed(spool, message(3000))
    path_a, path_b = spool.active_path(a), spool.active_path(b)
    entry_b = fmt.read_entry(path_b, keyring=keyring)
    region = entry_b.stored_length
    with open(path_a, "rb") as f:
        body_a = f.read(region)
    with open(path_b, "r+b") as f:
        f.write(body_a)  # same length: only the queue id binding can tell
    with pytest.raises(DecryptionError):
        entry = fmt.read_entry(path_b, keyring=keyring)
        b"".join(entry.body.chunks())


def test_without_keys_the_envelope_still_lists(spool):
    qid = committed(spool, message(1000))
    entry = fmt.read_entry(spool.active_path(qid))
    assert entry.envelope.recipients[0].path == "<bob@example.test>"
    with pytest.raises(DecryptionError, match="encrypted .*no keys were given"):
        entry.body.header_block()


def test_requeued_dead_letter_stays_sealed_and_readable(spool, keyring):
    qid = committed(spool, message(70_000))
    root = spool.queue_dir
    os.rename(spool.active_path(qid), os.path.join(spool.dead_dir, qid))
    assert files.requeue_entry(root, qid, 5000.0)
    entry = fmt.read_entry(spool.active_path(qid), keyring=keyring)
    assert entry.created == 5000.0
    assert b"".join(entry.body.chunks()) == TRACE + message(70_000)
    assert MARK not in disk_bytes(root)


def test_held_message_is_sealed_and_shown_only_with_keys(tmp_path, keyring):
    root = str(tmp_path / "queue")
    qid = hold_message(root, envelope("bob@example.test"), message(4000), TRACE, keyring)
    assert MARK not in disk_bytes(root)
    shown = describe(root, qid, keyring)
    assert "Subject: " + MARK.decode() in shown and "198.51.100.9" in shown
    with pytest.raises(ControlError, match="encrypted"):
        describe(root, qid)


def test_a_clear_spool_reads_sealed_and_clear_files_alike(tmp_path, keyring):
    """Turning encryption on (or off) leaves the entries already queued readable."""
    root = str(tmp_path / "queue")
    clear = Spool(root, ThreadClock(), InlinePool())
    q1 = committed(clear, message(1000))
    sealed = Spool(root, ThreadClock(), InlinePool(), keyring=keyring)
    q2 = committed(sealed, message(1000))
    for qid in (q1, q2):
        entry = fmt.read_entry(sealed.active_path(qid), keyring=keyring)
        assert b"".join(entry.body.chunks()) == TRACE + message(1000)
