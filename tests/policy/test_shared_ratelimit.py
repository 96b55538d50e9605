"""Rate limits that hold across nodes: the token buckets in the database
(`RateBuckets`, `SharedRateLimiter`), on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.internet import defer, task, threads

from mta.config import build_config
from mta.db import Database, DatabaseHandle
from mta.policy.compose import policy_pipeline
from mta.policy.ratelimit import RATE_LIMITED, RateBuckets, RateLimitCheck, SharedRateLimiter
from mta.policy.verdict import Action, Phase, PolicyContext
from mta.testing import FakeDirectory, FakeSenderPolicy


def test_a_bucket_gives_its_tokens_then_refills(db_location):
    db = Database(db_location)
    try:
        taken = [db.take_token("ip:192.0.2.1", 3, 3 / 60, 1000.0) for _ in range(5)]
        assert taken == [True, True, True, False, False]
        assert db.take_token("ip:192.0.2.2", 3, 3 / 60, 1000.0)  # another key: its own
        assert db.take_token("ip:192.0.2.1", 3, 3 / 60, 1020.0)  # 20 s: one more token
        assert not db.take_token("ip:192.0.2.1", 3, 3 / 60, 1020.0)
        assert db.purge_rate_buckets(before=1010.0) == 1  # .2, untouched since 1000
        assert db.purge_rate_buckets(before=1100.0) == 1
        assert db.take_token("ip:192.0.2.1", 3, 3 / 60, 1100.0)  # a fresh, full bucket
    finally:
        db.close()


def test_nodes_racing_for_the_last_tokens_never_overdraw(db_location):
    """Four "nodes" (connections of their own) take from one bucket of 50 at once."""
    Database(db_location).close()  # migrated once, before the race
    granted = []
    lock = threading.Lock()

    def node():
        db = Database(db_location)
        try:
            mine = sum(db.take_token("user:bob", 50, 0.0, 5000.0) for _ in range(30))
        finally:
            db.close()
        with lock:
            granted.append(mine)

    workers = [threading.Thread(target=node) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sum(granted) == 50  # 120 asked, exactly the bucket's 50 given


@pytest_twisted.inlineCallbacks
def test_the_check_answers_451_from_the_shared_bucket(db_location):
    from twisted.internet import reactor

    clock = task.Clock()
    handle = DatabaseHandle(db_location)
    try:
        run = lambda f, *a: threads.deferToThread(f, *a)  # noqa: E731
        config = build_config({"limits": {"messages_per_ip_per_minute": 2}})
        buckets = RateBuckets(handle, run, clock)
        pipeline = policy_pipeline(
            config, reactor, FakeDirectory({}), FakeSenderPolicy({}), rate_buckets=buckets
        )
        [check] = [c for c in pipeline.checks_for(Phase.MAIL) if c.name == "rate-ip"]
        assert isinstance(check, RateLimitCheck)
        assert isinstance(check.limiter, SharedRateLimiter)
        # a second node: its own pipeline, the same database
        other = RateLimitCheck(SharedRateLimiter(RateBuckets(handle, run, clock), 2, "ip"), "ip")
        context = PolicyContext("198.51.100.7", "smtp")
        first = yield defer.maybeDeferred(check.check, Phase.MAIL, context)
        second = yield defer.maybeDeferred(other.check, Phase.MAIL, context)
        third = yield defer.maybeDeferred(check.check, Phase.MAIL, context)
        assert (first.action, second.action) == (Action.ACCEPT, Action.ACCEPT)
        assert third.action is Action.TEMPFAIL and third.reply == RATE_LIMITED
        clock.advance(30)  # one token back (2 per minute)
        fourth = yield defer.maybeDeferred(other.check, Phase.MAIL, context)
        assert fourth.action is Action.ACCEPT
    finally:
        yield threads.deferToThread(handle.close)


def test_without_a_shared_database_the_limits_stay_in_the_process():
    config = build_config({"limits": {"messages_per_ip_per_minute": 2}})
    pipeline = policy_pipeline(config, task.Clock(), FakeDirectory({}), FakeSenderPolicy({}))
    [check] = [c for c in pipeline.checks_for(Phase.MAIL) if c.name == "rate-ip"]
    assert not isinstance(check.limiter, SharedRateLimiter)
