#!/usr/bin/env python3
"""The reference harness (bench_target.py) against one node or a cluster of nodes,
with delivery counted from every node's /metrics and CPU per message split between
the mta processes, PostgreSQL and HAProxy (issue #14; driven by run_cluster.sh).

Like bench_stores.py, this runs bench_target.py unchanged with its Maildir helpers
replaced, and adds:

- ``--maildir URL[,URL...]``: a "count" is the SUM over the URLs of
  ``mta_delivery_attempts_total{result="delivered"}`` (one per recipient; the shapes
  send to one), so two nodes behind HAProxy are counted together.
- CPU split, read from /proc/<pid>/stat (utime+stime+cutime+cstime) right after the
  harness "clears" the counters (just before the load starts) and again when the
  shape is done (every message delivered): ``mta_cpu_ms_per_msg`` (the target's
  process tree without haproxy and the launching shell), ``haproxy_cpu_ms_per_msg``
  (haproxy processes in that tree), ``pg_cpu_ms_per_msg`` (every process named
  ``postgres`` on the machine: the backends, the postmaster, whose cutime/cstime
  count backends that exited, and the WAL writer/checkpointer, shared with anything
  else using that server), ``pgdb_cpu_ms_per_msg`` (only the live backends connected
  to ``--pg-db``, the bench's own database) and ``all_cpu_ms_per_msg`` (mta +
  haproxy + PostgreSQL, all processes).

  python3 bench_cluster.py --name pg2 --addr 127.0.0.1:20210 --start "exec bash ..." \\
      --maildir http://127.0.0.1:20213/metrics,http://127.0.0.1:20215/metrics \\
      --pg-db mta_bench_cl_pg2 --shapes lat_c20 --out RESULTS.jsonl
  python3 bench_cluster.py --report RESULTS.jsonl [--baseline file] [--markdown]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_stores  # noqa: E402  (patches bench_target's Maildir helpers)
import bench_target as bt  # noqa: E402
import report  # noqa: E402

ROWS = [
    ("lat_c20", "msgs_per_s", "L1 c=20 4KB persistent: accepted msg/s", True),
    ("lat_c20", "p50_ms", "L1   p50 ms (MAIL -> 250 after dot)", False),
    ("lat_c20", "p99_ms", "L1   p99 ms", False),
    ("lat_c20", "delivered_per_s", "L1   delivered msg/s (to the last delivery)", True),
    ("lat_c20", "mta_cpu_ms_per_msg", "L1   CPU ms/msg: mta (all nodes)", False),
    ("lat_c20", "pg_cpu_ms_per_msg", "L1   CPU ms/msg: PostgreSQL (all processes)", False),
    ("lat_c20", "pgdb_cpu_ms_per_msg", "L1   CPU ms/msg: PostgreSQL (bench db backends)", False),
    ("lat_c20", "haproxy_cpu_ms_per_msg", "L1   CPU ms/msg: haproxy", False),
    ("lat_c20", "all_cpu_ms_per_msg", "L1   CPU ms/msg: mta + PostgreSQL + haproxy", False),
    ("lat_c20", "client_cpu_util", "L1   client CPU (1.0 = one core busy)", False),
    ("src_s20_4k", "msgs_per_s", "S1 smtp-source 20 sess 4KB conn/msg: accepted msg/s", True),
    ("src_s20_4k", "delivered_per_s", "S1   delivered msg/s (to the last delivery)", True),
    ("src_s20_4k", "mta_cpu_ms_per_msg", "S1   CPU ms/msg: mta (all nodes)", False),
    ("src_s20_4k", "pg_cpu_ms_per_msg", "S1   CPU ms/msg: PostgreSQL (all processes)", False),
    ("src_s20_4k", "pgdb_cpu_ms_per_msg", "S1   CPU ms/msg: PostgreSQL (bench db backends)", False),
    ("src_s20_4k", "haproxy_cpu_ms_per_msg", "S1   CPU ms/msg: haproxy", False),
    ("src_s20_4k", "all_cpu_ms_per_msg", "S1   CPU ms/msg: mta + PostgreSQL + haproxy", False),
]

_pg_db: str | None = None
_before: dict[str, float] = {}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def postgres_pids(db: str | None = None) -> list[int]:
    """Every process named postgres; with `db`, only backends connected to it (their
    command line reads ``postgres: USER DB HOST(PORT) STATE``)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _comm(int(name)) == "postgres":
            if db is None or f" {db} " in _cmdline(int(name)):
                out.append(int(name))
    return out


def split_cpu(target_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of: mta (target tree minus haproxy and shells), haproxy,
    PostgreSQL (all), PostgreSQL backends of the bench database."""
    comms = {p: _comm(p) for p in target_pids}
    mta = [p for p, c in comms.items() if c not in ("haproxy", "bash", "sh")]
    haproxy = [p for p, c in comms.items() if c == "haproxy"]
    return {
        "mta": bt.cpu_of(mta),
        "haproxy": bt.cpu_of(haproxy),
        "pg": bt.cpu_of(postgres_pids()),
        "pgdb": bt.cpu_of(postgres_pids(_pg_db)) if _pg_db else 0.0,
    }


_target: "bt.Target | None" = None
_plain_clear = bt.maildir_clear
_plain_shape_load = bt.shape_load


def clear(urls: str) -> None:
    for url in urls.split(","):
        _plain_clear(url)
    # bench_target reads its own CPU baseline right after this: take ours too.
    _before.clear()
    _before.update(split_cpu(_target.pids() if _target else []))


def count(urls: str) -> int:
    return sum(bench_stores.count(url) for url in urls.split(","))


def shape_load(a, tgt, name, spec):
    global _target
    _target = tgt
    res = _plain_shape_load(a, tgt, name, spec)
    after = split_cpu(tgt.pids())
    accepted = res.get("ok") if spec["kind"] == "latency" else res.get("messages")
    if res.get("rc") not in (0, None) and spec["kind"] == "source":
        accepted = None
    if accepted and _before:
        total = 0.0
        for key in ("mta", "haproxy", "pg", "pgdb"):
            seconds = after[key] - _before.get(key, after[key])
            res[f"{key}_cpu_s"] = round(seconds, 3)
            res[f"{key}_cpu_ms_per_msg"] = round(seconds / accepted * 1000, 4)
            if key != "pgdb":
                total += seconds
        res["all_cpu_ms_per_msg"] = round(total / accepted * 1000, 4)
    return res


bt.maildir_clear = clear
bt.maildir_count = count
bt.shape_load = shape_load


def main() -> int:
    global _pg_db
    if "--report" in sys.argv:
        sys.argv.remove("--report")
        report.ROWS = ROWS
        try:
            report.main()
        except BrokenPipeError:  # e.g. piped into head, as report.py allows
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if "--pg-db" in sys.argv:
        i = sys.argv.index("--pg-db")
        _pg_db = sys.argv[i + 1]
        del sys.argv[i : i + 2]
    return bt.main()


if __name__ == "__main__":
    sys.exit(main())
