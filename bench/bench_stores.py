#!/usr/bin/env python3
"""The reference harness (bench_target.py) for any mail store: delivery is counted
from the server's own /metrics instead of Maildir files.

bench_target.py measures delivery by counting files in a Maildir's new/ and cur/.
mbox, sql, timeseries and s3 keep mail elsewhere, so this wrapper runs the same
harness, unchanged, with its three Maildir helpers replaced: `--maildir` takes the
``/metrics`` URL of the target, a "count" is ``mta_delivery_attempts_total
{result="delivered"}`` (one per recipient; the shapes send to one recipient), and
"clearing" records the current value as the new zero.  Everything else (shapes,
timing, CPU and memory readings, the JSON lines) is the harness's own.

  python3 bench_stores.py --name sql --addr 127.0.0.1:20030 --start "exec twistd ..." \
      --maildir http://127.0.0.1:20031/metrics --shapes lat_c20 --out RESULTS.jsonl
"""

import os
import re
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_target as bt  # noqa: E402

_DELIVERED = re.compile(r'^mta_delivery_attempts_total\{result="delivered"\} (\S+)$', re.M)
_zero: dict[str, float] = {}


def delivered(url: str) -> float:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0  # not up yet (or restarting): nothing new delivered
    match = _DELIVERED.search(text)
    return float(match.group(1)) if match else 0.0


def count(url: str) -> int:
    return int(delivered(url) - _zero.get(url, 0.0))


def clear(url: str) -> None:
    _zero[url] = delivered(url)


bt.maildir_count = count
bt.maildir_clear = clear

if __name__ == "__main__":
    sys.exit(bt.main())
