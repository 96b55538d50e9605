"""Retry policy as a plain function (python-slimta's idea): attempts -> delay.

Kept free of clocks and state so the schedule is trivially testable and the runner
owns all timing.  Jitter spreads retries of a large deferred backlog (say, after a
remote outage) so they do not all fire in the same second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def next_delay(
    attempts: int,
    schedule: Sequence[float],
    *,
    jitter: float = 0.0,
    random: Callable[[], float] | None = None,
) -> float | None:
    """Seconds to wait after the `attempts`-th failed attempt (1-based), or None to
    give up (empty schedule).  Past the end of the schedule its last delay repeats;
    the queue lifetime (`max_age`) is what finally ends retries.

    With `jitter` (a fraction, e.g. 0.1) and an injected `random` returning [0, 1),
    the delay is scaled by a factor in [1 - jitter, 1 + jitter).
    """
    if not schedule:
        return None
    delay = float(schedule[min(max(attempts, 1), len(schedule)) - 1])
    if jitter and random is not None:
        delay *= 1.0 - jitter + 2.0 * jitter * random()
    return max(delay, 0.0)
