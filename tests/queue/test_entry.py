"""Queue file format: metadata round trip, footer checks, status snapshots."""

from __future__ import annotations

import os

import pytest

from mta.envelope import Address, BodyType, DeliveryResult, Envelope, RecipientState
from mta.queue import entry as fmt


def write_entry(path, env, body=b"body\r\n", trace=b"Received: x\r\n", created=5.0):
    meta = fmt.encode_metadata("00aa", env, trace, len(body), created)
    with open(path, "wb") as f:
        f.write(body + fmt.encode_trailer(meta, len(body)))


def test_round_trip_keeps_every_envelope_field(tmp_path):
    env = Envelope(
        sender=Address("", ""),
        recipients=(Address("ünïcode", "exämple.test"), Address("a b", "example.test")),
        original_recipients=(Address("alias", "example.test"), Address("a b", "example.test")),
        helo="h",
        client_address="2001:db8::1",
        client_name="c.example",
        authenticated_as="alice@example.test",
        listener="submission",
        tls="TLSv1.3",
        body=BodyType.EIGHT_BIT,
        smtputf8=True,
        received_at=12.5,
    )
    path = str(tmp_path / "00aa")
    write_entry(path, env, trace="Received: from ü\r\n".encode())
    e = fmt.read_entry(path)
    assert e.envelope == env
    assert e.trace_headers == "Received: from ü\r\n".encode()
    assert e.created == 5.0 and e.body_length == 6
    assert e.states == [RecipientState.PENDING] * 2


def test_quarantine_reason_round_trips_and_is_absent_by_default(tmp_path):
    env = Envelope(Address("a", "b.test"), (Address("c", "d.test"),), quarantine="spam: 12.5")
    path = str(tmp_path / "00aa")
    write_entry(path, env)
    assert fmt.read_entry(path).envelope.quarantine == "spam: 12.5"
    plain = fmt.encode_metadata("00ab", Envelope(Address("a", "b.test"), ()), b"", 0, 1.0)
    assert b"quarantine" not in plain


@pytest.mark.parametrize("damage", ["truncate", "append", "footer"])
def test_damaged_files_are_rejected(tmp_path, damage):
    path = str(tmp_path / "00aa")
    write_entry(path, Envelope(Address("a", "b.test"), (Address("c", "d.test"),)))
    if damage == "truncate":
        os.truncate(path, os.path.getsize(path) - 1)
    elif damage == "append":
        with open(path, "ab") as f:
            f.write(b"x")
    else:
        data = open(path, "rb").read().replace(b"MTA-QUEUE 1", b"MTA-QUEUE 9")
        open(path, "wb").write(data)
    with pytest.raises(fmt.CorruptEntry):
        fmt.read_entry(path)


def test_status_last_complete_snapshot_wins(tmp_path):
    path = str(tmp_path / "00aa")
    a, b = Address("a", "x.test"), Address("b", "x.test")
    write_entry(path, Envelope(Address("s", "x.test"), (a, b)))
    e = fmt.read_entry(path)
    e.apply([DeliveryResult.delivered(a), DeliveryResult.deferred(b, "451 try later")])
    e.attempts, e.next_attempt = 1, 99.0
    with open(path + fmt.STATUS_SUFFIX, "wb") as f:
        f.write(fmt.encode_status(e))
        f.write(b'{"version":1,"attempts":2,"sta')  # torn append
    again = fmt.read_entry(path)
    assert again.states == [RecipientState.DELIVERED, RecipientState.DEFERRED]
    assert again.details[1] == "451 try later"
    assert (again.attempts, again.next_attempt, again.last_error) == (1, 99.0, "451 try later")
    assert again.pending_recipients() == [b]


def test_pending_recipients_unique_and_fail_remaining():
    a = Address("a", "x.test")
    e = fmt.QueueEntry("00aa", Envelope(Address("s", "x.test"), (a, a)), "/p", 1)
    assert e.pending_recipients() == [a]
    assert e.job().message_tag(a) == "00aa-0"
    assert e.fail_remaining("expired") == [a, a]
    assert e.is_finished and e.has_failures
