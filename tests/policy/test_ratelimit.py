"""Token-bucket message rate limits with an injected clock."""

from __future__ import annotations

from twisted.internet import task

from mta.policy.ratelimit import RATE_LIMITED, RateLimiter


def test_reply():
    assert (RATE_LIMITED.code, RATE_LIMITED.enhanced) == (451, "4.7.1")


def test_zero_means_off():
    limiter = RateLimiter(task.Clock(), 0)
    assert all(limiter.allow("192.0.2.1") for _ in range(10_000))
    assert len(limiter) == 0


def test_burst_then_refill():
    clock = task.Clock()
    limiter = RateLimiter(clock, 6)  # one token per 10 s
    assert [limiter.allow("a") for _ in range(7)] == [True] * 6 + [False]
    assert limiter.allow("b")  # keys are independent
    clock.advance(9.9)
    assert not limiter.allow("a")
    clock.advance(0.2)
    assert limiter.allow("a")
    assert not limiter.allow("a")
    clock.advance(60)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 6 + [False]


def test_sustained_rate_is_the_limit():
    clock = task.Clock()
    limiter = RateLimiter(clock, 30)
    allowed = 0
    for _ in range(600):  # ten minutes, one attempt per second
        allowed += limiter.allow("k")
        clock.advance(1)
    assert 300 <= allowed <= 330  # 30/min plus the initial burst


def test_idle_keys_are_evicted():
    clock = task.Clock()
    limiter = RateLimiter(clock, 10)
    for i in range(1000):
        limiter.allow(f"198.51.100.{i}")
    assert len(limiter) == 1000
    clock.advance(61)
    limiter.allow("new")
    assert len(limiter) == 1


def test_memory_is_capped():
    clock = task.Clock()
    limiter = RateLimiter(clock, 10, max_keys=100)
    for i in range(1000):
        limiter.allow(i)
    assert len(limiter) == 100
