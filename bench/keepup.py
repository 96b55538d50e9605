#!/usr/bin/env python3
"""Does delivery keep up with arrival?  Runs a load command against a running
`twistd mta` while reading its /metrics twice a second, and reports the accepted
and delivered rates over the same window, the queue's depth through the run and
the server's RSS (issue #13: "S3 delivery keeps up with the L1 arrival rate with
bounded memory").

Keeping up means the delivered rate matches the accepted rate while the load runs
and the queue's depth levels off instead of growing with time; the report gives
the depth at each quarter of the run and how long the queue took to empty after
the load stopped.

  python3 bench/keepup.py --metrics http://127.0.0.1:20103/metrics --pid PID -- \\
      python3 bench/smtp_latency.py 127.0.0.1:20102 -c 20 -m 20000 -l 4096 --pipelining off

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request

_SAMPLE = re.compile(
    r"^(mta_queued_messages_total|mta_delivery_attempts_total\{result=\"delivered\"\}|mta_queue_depth\{state=\"\w+\"\}) (\S+)$",
    re.M,
)


def sample(url: str) -> tuple[float, float, float]:
    """(queued so far, delivered so far, messages in the queue now)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    queued = delivered = depth = 0.0
    for name, value in _SAMPLE.findall(text):
        if name == "mta_queued_messages_total":
            queued = float(value)
        elif name.startswith("mta_delivery_attempts_total"):
            delivered = float(value)
        else:
            depth += float(value)
    return queued, delivered, depth


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the server process (for its RSS)")
    ap.add_argument("--drain-timeout", type=float, default=300)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    samples: list[tuple[float, float, float, float, float]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            q, d, depth = sample(a.metrics)
            samples.append((time.monotonic(), q, d, depth, rss_mb(a.pid)))
            stop.wait(0.5)

    q0, d0, _ = sample(a.metrics)
    rss0 = rss_mb(a.pid)
    poller = threading.Thread(target=poll, daemon=True)
    t0 = time.monotonic()
    poller.start()
    load = subprocess.run(command, capture_output=True, text=True)
    t1 = time.monotonic()
    # The queue empties after the load: how long that takes says how far behind it was.
    deadline = t1 + a.drain_timeout
    while time.monotonic() < deadline:
        q, d, depth = sample(a.metrics)
        if d - d0 >= q - q0 and depth == 0:
            break
        time.sleep(0.2)
    t2 = time.monotonic()
    stop.set()
    poller.join()
    during = [s for s in samples if s[0] <= t1]
    # The steady part: from a quarter into the load to its end (start-up excluded).
    start = next((s for s in during if s[0] >= t0 + (t1 - t0) / 4), during[0])
    end = during[-1]
    span = end[0] - start[0]
    quarter = [during[min(len(during) - 1, int(len(during) * k / 4))][3] for k in (1, 2, 3, 4)]
    result = {
        "command": " ".join(command[:2]) + " ...",
        "rc": load.returncode,
        "load_s": round(t1 - t0, 2),
        "accepted": int(q - q0),
        "accepted_per_s": round((end[1] - start[1]) / span, 1) if span else None,
        "delivered_per_s": round((end[2] - start[2]) / span, 1) if span else None,
        "depth_by_quarter": quarter,
        "depth_max": max(s[3] for s in samples),
        "drain_after_load_s": round(t2 - t1, 2),
        "rss_mb_start": round(rss0, 1),
        "rss_mb_max": round(max(s[4] for s in samples), 1),
        "rss_mb_end": round(rss_mb(a.pid), 1),
    }
    if result["accepted_per_s"]:
        result["delivered_over_accepted"] = round(
            result["delivered_per_s"] / result["accepted_per_s"], 3
        )
    if load.returncode:
        result["stderr"] = (load.stderr or load.stdout)[-400:]
    print(json.dumps(result))
    return 0 if load.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
