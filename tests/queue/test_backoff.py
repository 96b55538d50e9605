from mta.queue.backoff import next_delay


def test_schedule_then_last_delay_repeats():
    schedule = (60, 300, 900)
    assert [next_delay(n, schedule) for n in (1, 2, 3, 4, 10)] == [60, 300, 900, 900, 900]


def test_empty_schedule_gives_up():
    assert next_delay(1, ()) is None


def test_jitter_uses_injected_random():
    assert next_delay(1, (100,), jitter=0.1, random=lambda: 0.0) == 90.0
    assert next_delay(1, (100,), jitter=0.1, random=lambda: 0.5) == 100.0
    assert next_delay(1, (100,), jitter=0.1) == 100.0
