#!/usr/bin/env python3
"""Is a dead node's work taken over within its lease plus one poll? (issue #14)

Two `twistd mta` nodes, A and B, on one fresh PostgreSQL queue database (``--db``),
each its own datadir and hostname, ``[queue] lease = --lease`` (default 10 s),
relaying everything to a slow SMTP sink run by this script (``[relay] smarthost``):
the sink waits ``--sink-delay`` seconds after each message's final dot before its
250, and counts a message (by Message-ID, with the HELO name of the node that sent
it) only when it answers 250 on a connection still open, as a real peer would.

1. ``-n`` messages (unique Message-IDs, to ``to@remote.test``) are sent to A over SMTP:
   A leases each to itself at commit (up to its window of 100) and starts relaying
   them, ``--concurrency`` at a time, to the slow sink.
2. Once the sink has counted ``--kill-after`` of them, A gets ``kill -9``.  (The
   messages go ``--stagger`` seconds after both nodes started, by default a random
   part of B's poll interval, so that repeated runs sample the phase between B's
   poll and the kill.)
3. Measured from the kill: when A's leases expire (``max(lease_until)`` in the table),
   the first message the sink gets from B (the takeover itself: bounded by lease +
   poll), and the last: takeover_s = kill -> every message at the sink, which adds
   the time B needs to deliver what A held (b_delivery_s: ``held / concurrency x
   sink-delay`` with the defaults).  Every Message-ID is checked: none missing, none twice (a
   duplicate is the documented window of README.rst's "Cluster": the peer said 250
   and A died before it committed the result; the sink's log tells which).

Printed: lease, B's fallback poll interval (``PGQueueStore.poll_interval``, read from
the installed code), the first retry interval (``[queue] retry_schedule``), the bound
lease + poll, and the measured times.  Ports 20230 (A smtp, +1 http), 20232 (B, +1),
20239 (the sink); files under --dir (default /tmp/mta-bench-takeover).

  python3 bench/pg_takeover.py                      # 100 messages, lease 10 s (~40 s)
  python3 bench/pg_takeover.py --lease 30 -n 200
"""

import argparse
import asyncio
import json
import os
import random
import signal
import smtplib
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from pg_drain import REPO, Node, bench_config, log, psql  # noqa: E402


class SlowSink:
    """A minimal SMTP receiver on an asyncio loop in a thread; see the docstring."""

    def __init__(self, port: int, delay: float):
        self.port, self.delay = port, delay
        self.accepted: list[tuple[float, str, str]] = []  # (time.time(), message-id, helo)
        self.dropped: list[tuple[float, str, str]] = []  # full message, connection gone
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise SystemExit("the sink did not start")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        server = self.loop.run_until_complete(
            asyncio.start_server(self._session, "127.0.0.1", self.port)
        )
        self._ready.set()
        self.loop.run_forever()
        server.close()

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def snapshot(self):
        with self._lock:
            return list(self.accepted), list(self.dropped)

    async def _session(self, reader, writer) -> None:
        helo = "?"
        try:
            writer.write(b"220 sink.bench.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    helo = line[5:].strip().decode(errors="replace")
                    writer.write(b"250 sink.bench.test\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    message_id = ""
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        if not message_id and data[:11].lower() == b"message-id:":
                            message_id = data[11:].strip().decode(errors="replace")
                    if not data:
                        return
                    await asyncio.sleep(self.delay)
                    record = (time.time(), message_id, helo)
                    if writer.is_closing() or reader.at_eof():
                        with self._lock:
                            self.dropped.append(record)
                        return
                    writer.write(b"250 2.0.0 queued\r\n")
                    await writer.drain()
                    with self._lock:
                        self.accepted.append(record)
                    continue
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()


def node_toml(a, name: str, port: int, dsn: str) -> str:
    toml = bench_config(f"{a.dir}/{name}", port).replace(
        'hostname = "mta.bench.test"', f'hostname = "{name}.bench.test"'
    )
    return toml + (
        '\n[storage]\nbackend = "maildir"\n'
        f'\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease = {a.lease}\n'
        f"retry_schedule = [{a.retry}]\ndelivery_concurrency = {a.concurrency}\n"
        f'\n[relay]\nsmarthost = "127.0.0.1:{a.sink_port}"\nhelo = "{name}.bench.test"\n'
    )


def poll_interval(venv: str) -> float:
    code = (
        "import inspect, mta.queue.pgstore as m;"
        "print(inspect.signature(m.PGQueueStore).parameters['poll_interval'].default)"
    )
    out = subprocess.run([os.path.join(venv, "bin", "python"), "-c", code],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return float(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=100, help="messages sent to node A")
    ap.add_argument("--lease", type=float, default=10.0, help="[queue] lease, seconds (>= 5)")
    ap.add_argument("--retry", type=float, default=5.0, help="[queue] retry_schedule = [RETRY]")
    ap.add_argument("--concurrency", type=int, default=5, help="[queue] delivery_concurrency")
    ap.add_argument("--sink-delay", type=float, default=0.5, help="seconds before each 250")
    ap.add_argument("--sink-port", type=int, default=20239)
    ap.add_argument("--kill-after", type=int, default=10, help="kill A when the sink has this many")
    ap.add_argument(
        "--stagger", type=float, default=None,
        help="seconds between starting the nodes and sending (default: random in [0, poll])",
    )  # fmt: skip
    ap.add_argument("--db", default="mta_bench_takeover")
    ap.add_argument("--admin-dsn", default=os.environ.get(
        "PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))  # fmt: skip
    ap.add_argument("--venv", default=os.environ.get("MTA_VENV", os.path.join(REPO, ".venv")))
    ap.add_argument("--dir", default="/tmp/mta-bench-takeover")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=None, help="append the result as a JSON line here")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    psql(a.admin_dsn, None, f"DROP DATABASE IF EXISTS {a.db}")
    psql(a.admin_dsn, None, f"CREATE DATABASE {a.db}")
    dsn = a.admin_dsn.rsplit("/", 1)[0] + "/" + a.db
    poll = poll_interval(a.venv)
    sink = SlowSink(a.sink_port, a.sink_delay)
    node_a = Node(a.venv, f"{a.dir}/nodea", node_toml(a, "nodea", 20230, dsn))
    node_b = Node(a.venv, f"{a.dir}/nodeb", node_toml(a, "nodeb", 20232, dsn))
    ids = [f"<tk-{i}-{os.getpid()}@bench.test>" for i in range(a.n)]
    stagger = 0.0
    try:
        node_a.start(20231)
        node_b.start(20233)
        # B's fallback poll runs every `poll` seconds from its start, A renews every
        # lease/3 from its own, and the kill comes a fixed ~2 s after the sending
        # starts: a random pause here samples where B's poll falls after the expiry
        # (without it, every run measured the same phase).
        stagger = a.stagger if a.stagger is not None else random.uniform(0.0, poll)
        time.sleep(stagger)
        log(f"sending {a.n} messages to node A")
        with smtplib.SMTP("127.0.0.1", 20230, timeout=30) as client:
            client.ehlo("client.bench.test")
            for mid in ids:
                body = f"Message-ID: {mid}\r\nSubject: takeover\r\n\r\n" + "x" * 2000 + "\r\n"
                client.sendmail("from@example.com", ["to@remote.test"], body)
        deadline = time.monotonic() + a.timeout
        while sink.count() < a.kill_after:
            if time.monotonic() > deadline:
                raise SystemExit(f"the sink got only {sink.count()} messages")
            time.sleep(0.01)
        os.kill(node_a.proc.pid, signal.SIGKILL)
        killed = time.time()
        node_a.proc.wait(10)
        at_kill = sink.count()
        row = psql(
            a.admin_dsn, a.db,
            "SELECT count(*), max(lease_until) FROM queue_entries WHERE lease_owner LIKE 'nodea.%'",
        ).split("|")  # fmt: skip
        held, lease_end = int(row[0]), float(row[1] or killed)
        log(f"kill -9 node A: the sink had {at_kill}; A still leased {held} entries")
        expected = set(ids)
        while True:
            accepted, dropped = sink.snapshot()
            if expected <= {r[1] for r in accepted} or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        done = time.time()
        time.sleep(2)  # anything arriving twice late still counts
        accepted, dropped = sink.snapshot()
        left = int(psql(a.admin_dsn, a.db, "SELECT count(*) FROM queue_entries"))
    finally:
        node_a.stop()
        node_b.stop()
    got = [r[1] for r in accepted]
    from_b = [r for r in accepted if r[2].startswith("nodeb") and r[0] >= killed]
    twice = sorted({m for m in got if got.count(m) > 1})
    result = {
        "messages": a.n,
        "lease_s": a.lease,
        "poll_interval_s": poll,
        "retry_interval_s": a.retry,
        "bound_lease_plus_poll_s": a.lease + poll,
        "sink_delay_s": a.sink_delay,
        "stagger_s": round(stagger, 2),
        "concurrency": a.concurrency,
        "at_sink_when_killed": at_kill,
        "leased_by_a_when_killed": held,
        "a_leases_expired_after_s": round(lease_end - killed, 2),
        "first_from_b_after_s": round(min(r[0] for r in from_b) - killed, 2) if from_b else None,
        "takeover_s": round(max(r[0] for r in accepted) - killed, 2) if accepted else None,
        "b_delivery_s": round(max(r[0] for r in from_b) - min(r[0] for r in from_b), 2)
        if from_b
        else None,
        "all_at_sink": expected <= set(got),
        "done_after_s": round(done - killed, 2),
        "delivered_by_b_after_kill": len(from_b),
        "missing": sorted(expected - set(got))[:10],
        "missing_count": len(expected - set(got)),
        "twice": twice[:10],
        "twice_count": len(twice),
        # for each: how long before the kill the sink answered A's copy 250 (the window
        # between the peer's 250 and A's commit of that result)
        "twice_a_copy_ms_before_kill": [
            round((killed - min(r[0] for r in accepted if r[1] == m)) * 1000, 1) for m in twice
        ][:10],
        "dropped_unacknowledged_at_kill": len(dropped),
        "queue_left": left,
    }
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    ok = result["all_at_sink"] and not twice and left == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
