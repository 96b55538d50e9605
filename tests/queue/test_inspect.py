"""mailq-style listing of a queue directory."""

from __future__ import annotations

import os

from mta.envelope import DeliveryResult
from mta.queue.inspect import format_listing, list_entries
from mta.queue.spool import Spool
from tests.queue.doubles import InlinePool, ThreadClock, envelope


def test_lists_active_deferred_and_dead(tmp_path):
    clock = ThreadClock()
    clock.advance(1000)
    queue_dir = str(tmp_path / "queue")
    spool = Spool(queue_dir, clock, InlinePool())
    entries = []
    spool.on_commit = entries.append
    for rcpts in (["a@example.test"], ["b@example.test", "c@far.test"], ["d@example.test"]):
        f = spool.open(spool.new_queue_id())
        f.write(b"x" * 100)
        f.commit(envelope(*rcpts, received_at=clock.seconds()), b"Received: y\r\n")
    fresh, deferred, dead = entries
    deferred.attempts, deferred.next_attempt = 1, 1600.0
    deferred.apply(
        [
            DeliveryResult.delivered(deferred.envelope.recipients[0]),
            DeliveryResult.deferred(
                deferred.envelope.recipients[1], "451 4.4.0 remote delivery not configured"
            ),
        ]
    )
    spool.record(deferred)
    dead.apply([DeliveryResult.failed(dead.envelope.recipients[0], "550 5.1.1 no such user")])
    spool.bury(dead, "550 5.1.1 no such user")

    summaries = list_entries(queue_dir)
    assert [(s.qid, s.state) for s in summaries] == [
        (fresh.qid, "active"),
        (deferred.qid, "deferred"),
        (dead.qid, "dead"),
    ]
    assert summaries[1].recipients[0].state == "delivered"
    assert summaries[1].size == 113
    assert [s.qid for s in list_entries(queue_dir, dead=True)] == [dead.qid]

    text = format_listing(summaries, now=1300.0)
    assert fresh.qid in text and "5m" in text and "sender@remote.test" in text
    assert "c@far.test  [deferred]" in text
    assert "(451 4.4.0 remote delivery not configured)" in text
    assert "next attempt in 5m" in text
    assert "(550 5.1.1 no such user)" in text
    assert text.rstrip().endswith("in 3 Requests.")


def test_empty_and_vanishing(tmp_path):
    assert format_listing(list_entries(str(tmp_path / "nothing"))) == "Mail queue is empty\n"
    os.makedirs(tmp_path / "q" / "active")
    (tmp_path / "q" / "active" / "00000000000000000000000").write_bytes(b"garbage")
    [s] = list_entries(str(tmp_path / "q"))
    assert s.state == "corrupt"
    assert "corrupt" in format_listing([s])
