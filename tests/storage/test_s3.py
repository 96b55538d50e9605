"""The S3 store beyond the contract suite, against a real SeaweedFS (which checks
signatures): one object per message, multipart uploads, a wrong secret, S3 down,
retries after a 503 and after a timeout (with an injected clock), encryption.  The
tests of what the index keeps run with it in SQLite and in PostgreSQL (`s3_index`)."""

from __future__ import annotations

import functools
import re
import socket
import threading
from urllib.parse import quote

import pytest
from twisted.internet import task
from twisted.internet.threads import blockingCallFromThread

from mta.envelope import Address
from mta.queue.body import FileBody
from mta.s3.client import S3Client, S3Error
from mta.s3.reactor import ReactorThread
from mta.storage import StoreItem, crypto
from mta.storage.crypto import Keyring
from mta.storage.s3store import S3Store, object_key
from mta.testing import MemoryBody
from tests.conftest import free_port
from tests.s3server import S3Proxy
from tests.storage.conftest import S3_BUCKET, make_client, s3_prefix

BOB = Address("bob", "example.test")
CAROL = Address("carol", "example.test")
DAVE = Address("dave", "other.test")
MESSAGE = (
    b"Received: from x by mx.example.test; Fri, 4 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <20261204.abc/def@remote.test>\r\nFrom: Alice <alice@remote.test>\r\n"
    b"Subject: quarterly caf\xc3\xa9 report\r\n\r\nbody \x80\xfe line\r\n.\r\n"
)
KEYRING = Keyring.of(bytes(range(32)))


def prefix_for(box: Address) -> bytes:
    return f"Return-Path: <alice@remote.test>\r\nDelivered-To: {box}\r\n".encode()


def items_for(body, *boxes, tag="00ab"):
    return [StoreItem(box, f"{tag}-{i}", prefix_for(box), body) for i, box in enumerate(boxes)]


def keys_of(store: S3Store) -> list[str]:
    return store.call(store.client.list_keys, store.prefix)


def test_object_keys_are_dated_safe_and_unique():
    now = 1796380800.0  # 2026-12-04 UTC
    key = object_key("mail/", now, "<a b/../c@x.test>", "00ab-0")
    assert key == "mail/2026/12/04/a_b_.._c@x.test~00ab-0.eml"
    assert object_key("", now, None, "00ab-0") == "2026/12/04/00ab-0.eml"
    assert object_key("", now, "<../..>", "00ab-1") == "2026/12/04/00ab-1.eml"
    assert len(object_key("", now, "<" + "x" * 5000 + ">", "t")) < 200


@pytest.mark.parametrize(
    "header_block",
    [
        b"Subject: x\r\nMessage-ID: <a.b@c.d>\r\n\r\n",
        b"message-id:<a@b>\r\nMessage-ID: <second@b>\r\n\r\n",
        b"X-Message-ID: <not@this>\r\nSubject: none\r\n\r\n",
        b"Message-Id: <a@b>\r\n\t<folded@c>\r\nFrom: x\r\n\r\n",
        b"Message-ID: <caf\xc3\xa9@x>\r\n\r\n",
        b"Message-ID:\r\n\r\n",
        b"From: a\r\n\r\n",
    ],
)
def test_the_key_takes_the_message_id_the_email_package_reads(header_block):
    """The key's Message-ID comes from a scan of the header section, not a parse:
    the same key as with the email package's value."""
    import email.parser
    import email.policy

    from mta.storage.s3store import _message_id

    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header_block)
    expected = parsed.get("Message-ID")
    expected = str(expected) if expected else None
    now = 1796380800.0
    assert object_key("", now, _message_id(header_block), "t") == object_key("", now, expected, "t")


def test_one_object_for_every_recipient_of_a_message(s3_store_factory, tmp_path, s3_index):
    store = s3_store_factory(tmp_path, index=s3_index)
    body = MemoryBody(MESSAGE)
    outcomes = store.deliver_batch(items_for(body, BOB, CAROL, DAVE))
    assert all(isinstance(o, str) for o in outcomes), outcomes
    [key] = keys_of(store)
    assert key.startswith(store.prefix) and key.endswith("20261204.abc_def@remote.test~00ab-0.eml")
    for box in (BOB, CAROL, DAVE):
        [msg] = store.list_messages(box)
        assert store.read_message(box, msg.message_id) == prefix_for(box) + MESSAGE
        assert msg.size == len(prefix_for(box) + MESSAGE)
    # The object goes with the last message that needs it.
    store.delete_message(BOB, store.list_messages(BOB)[0].message_id)
    assert store.remove_mailbox(CAROL) is True
    assert keys_of(store) == [key]
    store.delete_message(DAVE, store.list_messages(DAVE)[0].message_id)
    assert keys_of(store) == []


def test_search_finds_s3_mail(s3_store_factory, tmp_path, s3_index):
    store = s3_store_factory(tmp_path, index=s3_index)
    store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
    [hit] = store.search("quarterly report", user="bob@example.test")
    assert hit.subject.startswith("quarterly caf") and hit.from_addr.startswith("Alice")
    assert store.read_message(BOB, hit.message_id).endswith(MESSAGE)
    assert store.search("quarterly", user="carol@example.test") == []
    assert store.search("quarterly", user="BOB@example.test", limit=0) == []
    assert store.search("quarterly", since=hit.date + 1) == []
    assert [h.message_id for h in store.search("Alice", since=hit.date)] == [hit.message_id]


class PartSpy(S3Client):
    """The real client, noting the size of each part it uploads."""

    parts: list[int]

    async def upload_part(self, key, upload_id, number, body, payload_sha256):
        self.parts.append(len(body))
        return await super().upload_part(key, upload_id, number, body, payload_sha256)

    async def put_object(self, key, body, payload_sha256=None):
        self.parts.append(-len(body))
        return await super().put_object(key, body, payload_sha256)


@pytest.fixture
def spy_store(s3_server, tmp_path):
    thread = ReactorThread()
    client = PartSpy(thread.reactor, s3_server.endpoint, S3_BUCKET, "us-east-1", *_credentials())
    client.parts = []
    yield S3Store(client, str(tmp_path / "mta.db"), thread.call, prefix=s3_prefix(tmp_path))
    thread.stop()


def _credentials():
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    return ACCESS_KEY, SECRET_KEY


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_9_mib_message_goes_up_in_parts(spy_store, tmp_path, encrypted):
    spy_store.keyring = KEYRING if encrypted else None
    big = MESSAGE + bytes(range(256)) * (9 * 4096) + b"\r\n"
    path = tmp_path / "queued"
    path.write_bytes(big + b"TRAILER")  # a queue file: the body is its first len(big) bytes
    body = FileBody(b"", str(path), len(big))
    [where] = spy_store.deliver_batch(items_for(body, BOB))
    assert isinstance(where, str), where
    assert open_uploads(spy_store) == []
    parts = spy_store.client.parts
    assert len(parts) == 2 and parts[0] == 8 * 1024 * 1024 and 0 < parts[1] < parts[0]
    [msg] = spy_store.list_messages(BOB)
    assert spy_store.read_message(BOB, msg.message_id) == prefix_for(BOB) + big


def test_a_short_big_body_aborts_the_upload(spy_store, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"x" * (9 * 1024 * 1024))
    body = FileBody(b"", str(path), 10 * 1024 * 1024)
    [outcome] = spy_store.deliver_batch(items_for(body, BOB))
    assert isinstance(outcome, OSError) and "shorter than recorded" in str(outcome)
    assert spy_store.client.parts == [8 * 1024 * 1024]  # one part went up, then the abort
    assert keys_of(spy_store) == [] and spy_store.list_messages(BOB) == []
    assert open_uploads(spy_store) == []


def open_uploads(store: S3Store) -> list[bytes]:
    """Keys of the multipart uploads begun under the store's prefix and not finished."""
    query = f"uploads=&prefix={quote(store.prefix, safe='')}"
    listing = store.call(functools.partial(store.client.request, "GET", query=query))
    return re.findall(rb"<Key>([^<]*)</Key>", listing.body)


def test_a_wrong_secret_is_a_clear_temporary_error(s3_store_factory, tmp_path):
    store = s3_store_factory(tmp_path, secret="not-the-secret")
    [outcome] = store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
    assert isinstance(outcome, S3Error) and isinstance(outcome, OSError)
    assert outcome.status == 403 and "SignatureDoesNotMatch" in str(outcome)
    assert "secret_access_key_file" in str(outcome)
    with pytest.raises(S3Error, match="403"):
        store.probe()
    assert store.list_messages(BOB) == []


def test_s3_down_fails_delivery_temporarily_and_the_probe_says_why(s3_store_factory, tmp_path):
    port = free_port()
    store = s3_store_factory(tmp_path, endpoint=f"http://127.0.0.1:{port}", attempts=1)
    [outcome] = store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
    assert isinstance(outcome, OSError)
    assert (
        str(outcome) == f"s3: http://127.0.0.1:{port}/{S3_BUCKET} unreachable: connection refused"
    )
    assert store.list_messages(BOB) == [] and not store.has_delivered(BOB, "00ab-0")
    with pytest.raises(S3Error) as e:
        store.probe()
    assert (
        str(e.value) == f"s3: http://127.0.0.1:{port}/{S3_BUCKET} unreachable: connection refused"
    )


def test_probe_of_a_healthy_store(s3_store_factory, tmp_path):
    assert S3_BUCKET in s3_store_factory(tmp_path).probe()
    assert "encrypted" in s3_store_factory(tmp_path, KEYRING).probe()


# -- retries, on an injected clock ----------------------------------------------------


class BlackHole:
    """Accepts connections and never answers; `accepted` is set for each one."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = threading.Semaphore(0)
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.release()

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def clocked(s3_server, tmp_path):
    """(make_store(endpoint, attempts), thread, clock, retries): a store whose client
    waits (backoff, timeouts) on a task.Clock the test moves on the reactor thread;
    `retries` gets (attempt, delay) each time a retry is scheduled."""
    thread = ReactorThread()
    clock = task.Clock()
    retries = []
    retry_set = threading.Semaphore(0)

    def on_retry(attempt, delay, failure):
        retries.append((attempt, delay))
        retry_set.release()

    def make(endpoint, attempts=3):
        client = make_client(
            thread.reactor, endpoint, clock=clock, attempts=attempts, on_retry=on_retry, timeout=30
        )
        return S3Store(client, str(tmp_path / "mta.db"), thread.call, prefix=s3_prefix(tmp_path))

    def advance(seconds):
        blockingCallFromThread(thread.reactor, clock.advance, seconds)

    yield make, advance, retry_set, retries
    thread.stop()


def in_thread(f, *args):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("result", f(*args)))
    t.start()
    return t, box


def test_a_503_is_retried_after_a_backoff(s3_server, clocked):
    make, advance, retry_set, retries = clocked
    proxy = S3Proxy(int(s3_server.endpoint.rpartition(":")[2]), fail=1)
    try:
        store = make(f"http://127.0.0.1:{proxy.port}")
        t, box = in_thread(store.deliver_batch, items_for(MemoryBody(MESSAGE), BOB))
        assert retry_set.acquire(timeout=60)
        assert retries == [(1, 0.25)] and t.is_alive()  # waiting on the clock
        advance(0.25)
        t.join(60)
        [where] = box["result"]
        assert isinstance(where, str), where
        assert proxy.requests and proxy.requests[0].startswith(b"PUT /mta-test/")
        [msg] = store.list_messages(BOB)
        assert store.read_message(BOB, msg.message_id) == prefix_for(BOB) + MESSAGE
    finally:
        proxy.close()


def test_no_answer_times_out_and_is_retried_then_fails(clocked):
    make, advance, retry_set, retries = clocked
    hole = BlackHole()
    try:
        store = make(f"http://127.0.0.1:{hole.port}", attempts=2)
        t, box = in_thread(store.deliver_batch, items_for(MemoryBody(MESSAGE), BOB))
        assert hole.accepted.acquire(timeout=60)
        advance(30)  # the request's timeout
        assert retry_set.acquire(timeout=60) and retries == [(1, 0.25)]
        advance(0.25)
        assert hole.accepted.acquire(timeout=60)
        advance(30)
        t.join(60)
        [outcome] = box["result"]
        assert isinstance(outcome, S3Error)
        assert "unreachable: no answer within 30s (after 2 attempts)" in str(outcome)
        assert store.list_messages(BOB) == []
    finally:
        hole.close()


# -- encryption -----------------------------------------------------------------------


def index_contents(store: S3Store, tmp_path) -> bytes:
    """Everything the index keeps: the SQLite file, or every row's values."""
    if store.index.location == str(tmp_path / "mta.db"):
        return (tmp_path / "mta.db").read_bytes()
    import psycopg

    with psycopg.connect(store.index.location) as conn:
        rows = conn.execute("SELECT * FROM messages").fetchall()
    assert rows
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for r in rows for v in r)


def test_encrypted_objects_hold_no_clear_text_and_cannot_be_swapped(
    s3_store_factory, tmp_path, s3_index
):
    store = s3_store_factory(tmp_path, KEYRING, index=s3_index)
    store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB, CAROL, tag="00aa"))
    store.deliver_batch(items_for(MemoryBody(MESSAGE.replace(b"quarterly", b"annual")), BOB))
    k1, k2 = sorted(keys_of(store))
    blob = store.call(store.client.get_object, k1)
    assert b"quarterly" not in blob and b"alice" not in blob and crypto.blob_tag(blob) == k1
    # The index keeps no clear text either: each row's own lines are sealed.
    db = index_contents(store, tmp_path)
    assert b"Delivered-To" not in db and b"quarterly" not in db and b"alice@" not in db
    first, second = store.list_messages(BOB)
    assert store.read_message(BOB, first.message_id) == prefix_for(BOB) + MESSAGE
    # An object copied over another key does not decrypt: its key is authenticated.
    store.call(store.client.put_object, k2, blob)
    with pytest.raises(crypto.DecryptionError, match="altered"):
        store.read_message(BOB, second.message_id)
    assert store.search("quarterly") == []  # nothing clear to search


def test_a_wrong_master_key_is_a_clear_error(s3_store_factory, tmp_path, s3_index):
    store = s3_store_factory(tmp_path, KEYRING, index=s3_index)
    store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
    [msg] = store.list_messages(BOB)
    other = s3_store_factory(tmp_path, Keyring.of(b"\x01" * 32), index=s3_index)
    with pytest.raises(crypto.DecryptionError, match="wrong master key"):
        other.read_message(BOB, msg.message_id)


def test_key_retire_rewraps_rows_and_objects(s3_store_factory, tmp_path, s3_index):
    old, new = bytes(range(32)), b"\x02" * 32
    store = s3_store_factory(tmp_path, Keyring.of(old), index=s3_index)
    store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB, CAROL))
    rotated = s3_store_factory(tmp_path, Keyring.of(new, old), index=s3_index)
    assert rotated.rewrap(crypto.key_id_of(old)) == 3  # two rows' lines, one object
    assert rotated.rewrap(crypto.key_id_of(old)) == 0
    only_new = s3_store_factory(tmp_path, Keyring.of(new), index=s3_index)
    for box in (BOB, CAROL):
        [msg] = only_new.list_messages(box)
        assert only_new.read_message(box, msg.message_id) == prefix_for(box) + MESSAGE


def test_a_batch_of_many_messages_keeps_several_puts_in_flight(
    s3_store_factory, tmp_path, s3_index
):
    store = s3_store_factory(tmp_path, index=s3_index)
    bodies = [MemoryBody(MESSAGE + b"%d\r\n" % n) for n in range(20)]
    items = [StoreItem(BOB, f"{n:04x}-0", prefix_for(BOB), body) for n, body in enumerate(bodies)]
    outcomes = store.deliver_batch(items)
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert len(keys_of(store)) == 20
    got = [store.read_message(BOB, m.message_id) for m in store.list_messages(BOB)]
    assert got == [prefix_for(BOB) + body.data for body in bodies]


def test_a_prefix_that_needs_percent_encoding_is_signed_right(s3_store_factory, tmp_path):
    store = s3_store_factory(tmp_path)
    store.prefix = s3_prefix(tmp_path) + "mail box+é=1/"
    [where] = store.deliver_batch(items_for(MemoryBody(MESSAGE), BOB))
    assert isinstance(where, str), where
    [key] = keys_of(store)
    assert key.startswith(store.prefix)
    [msg] = store.list_messages(BOB)
    assert store.read_message(BOB, msg.message_id) == prefix_for(BOB) + MESSAGE


def test_a_missing_bucket_is_named(s3_server, tmp_path):
    thread = ReactorThread()
    try:
        client = S3Client(
            thread.reactor, s3_server.endpoint, "no-such-bucket", "us-east-1", *_credentials()
        )
        store = S3Store(client, str(tmp_path / "mta.db"), thread.call)
        with pytest.raises(S3Error) as e:
            store.probe()
        assert e.value.status == 404 and e.value.code == "NoSuchBucket"
        assert "create the bucket 'no-such-bucket' first" in str(e.value)
    finally:
        thread.stop()
