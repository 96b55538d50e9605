#!/usr/bin/env python3
"""Does one node drain a large PostgreSQL queue with flat memory? (issue #14)

1. Fill: a fresh database (``--db``, dropped and created) and a *fill* node
   (`twistd mta`, [queue] backend = "postgresql") that accepts mail for
   ``to@bench.test`` but cannot deliver it: bench.test is not one of its local
   domains, so it relays it to ``[relay] smarthost`` = 127.0.0.1:20229, where nothing
   listens yet (a smarthost outage): the attempt fails (connection refused) and the
   entry is deferred for a day (``retry_schedule = [86400]``).  ``smtp-source -d -s 20
   -m N -l 4096`` sends the N messages through the product's own commit path (SMTP,
   group commit, 250), with ``in_flow_delay = 0`` so the growing backlog does not slow
   it.  When every entry is deferred (no lease left), the fill node is stopped.
2. ``mta-admin queue flush`` (the product's command) makes all N due at once.
3. Drain: the smarthost comes back (Postfix's ``smtp-sink`` on 20229) and a *drain*
   node with the same configuration (its own datadir and hostname) is started on the
   database.  With ``--deliver maildir`` the drain node has bench.test as a local
   domain instead and delivers into a Maildir (``to@bench.test``); every entry has one
   attempt behind it, so each delivery first looks for a copy in the mailbox (see
   README.md: that look is a scan of the mailbox, so the drain slows down as the
   mailbox grows).  Every ``--interval`` seconds this samples the node's VmRSS
   (/proc/PID/status) and the queue's size (``SELECT count(*) FROM queue_entries``
   through psql) until the queue is empty, then ``--tail`` more.  Samples go to
   ``--samples`` (CSV: t_s, rss_kb, queued) as they are taken; printed: drain rate
   (N / time from the node's start to empty, and over the middle 80%), RSS min /
   median / max while entries remain, the median RSS of the first 10% vs the last 10%
   of those samples, RSS after the queue is empty, and the dead letters left.

  python3 bench/pg_drain.py                       # 100,000 messages (~15 min here)
  python3 bench/pg_drain.py -n 2000               # smoke test
  python3 bench/pg_drain.py --skip-fill           # drain again what a fill left

Needs psql, smtp-source and smtp-sink; writes under --dir (default
/tmp/mta-bench-drain); ports 20220 (fill smtp, +1 http), 20222 (drain smtp, +1 http),
20229 (the smarthost: nothing else may listen there).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def log(msg: str) -> None:
    print(f"[drain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], check=True, capture_output=True, text=True).stdout


def bench_config(datadir: str, port: int) -> str:
    helper = os.path.join(HERE, "mta_config.sh")
    return sh(f'. "{helper}"; mta_bench_config "{datadir}" {port} 1')


def psql(admin: str, db: str | None, sql: str) -> str:
    dsn = admin.rsplit("/", 1)[0] + "/" + db if db else admin
    out = subprocess.run(
        ["psql", dsn, "-Atqc", sql], check=True, capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip()


class Node:
    """One `twistd -n mta` in its own process group, its log in the datadir."""

    def __init__(self, venv: str, datadir: str, toml: str):
        self.venv, self.datadir = venv, datadir
        self.config = datadir + ".toml"
        subprocess.run(["rm", "-rf", datadir, self.config], check=True)
        os.makedirs(datadir)
        with open(self.config, "w") as f:
            f.write(toml)
        self.admin("check-config")
        self.proc = None

    def admin(self, *args: str, stdin: str | None = None) -> str:
        cmd = [os.path.join(self.venv, "bin", "mta-admin"), "--config", self.config, *args]
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"mta-admin {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def start(self, http_port: int) -> None:
        self.logf = open(self.datadir + ".log", "ab")
        twistd = os.path.join(self.venv, "bin", "twistd")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "mta", "--config", self.config],
            stdout=self.logf,
            stderr=self.logf,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"node exited at start; see {self.datadir}.log")
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"node not ready after 60 s; see {self.datadir}.log")

    def rss_kb(self) -> int | None:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


SMARTHOST = 20229


def node_toml(a, name: str, port: int, dsn: str, local: bool) -> str:
    """A node on the queue database; `local`: bench.test is a local domain (Maildir),
    else mail to it is relayed to the smarthost 127.0.0.1:SMARTHOST."""
    toml = bench_config(f"{a.dir}/{name}", port).replace(
        'hostname = "mta.bench.test"', f'hostname = "{name}.bench.test"'
    )
    if not local:
        toml = toml.replace(
            'local_domains = ["bench.test"]', 'local_domains = ["fill.bench.test"]'
        ).replace(
            'postmaster = "postmaster@bench.test"', 'postmaster = "postmaster@fill.bench.test"'
        )
    toml += (
        '\n[storage]\nbackend = "maildir"\n'
        f'\n[queue]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
        "retry_schedule = [86400.0]\nin_flow_delay = 0.0\n"
    )
    if not local:
        toml += f'\n[relay]\nsmarthost = "127.0.0.1:{SMARTHOST}"\n'
    return toml


def fill(a, dsn: str) -> None:
    node = Node(a.venv, f"{a.dir}/fill", node_toml(a, "fill", 20220, dsn, local=False))
    node.start(20221)
    try:
        t0 = time.monotonic()
        log(f"fill: smtp-source -d -s 20 -m {a.n} -l {a.size} into the fill node")
        subprocess.run(
            [a.smtp_source, "-d", "-s", "20", "-m", str(a.n), "-l", str(a.size),
             "-f", "from@example.com", "-t", "to@bench.test", "-M", "client.bench.test",
             "127.0.0.1:20220"],
            check=True, timeout=a.timeout,
        )  # fmt: skip
        sent = time.monotonic() - t0
        log(f"fill: {a.n} accepted in {sent:.0f} s ({a.n / sent:.0f} msg/s); waiting for defers")
        deadline = time.monotonic() + a.timeout
        while True:
            row = psql(
                a.admin_dsn, a.db,
                "SELECT count(*), count(*) FILTER (WHERE attempts > 0 AND lease_owner IS NULL)"
                " FROM queue_entries",
            ).split("|")  # fmt: skip
            total, deferred = int(row[0]), int(row[1])
            if total >= a.n and deferred == total:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"fill: only {deferred} of {total} deferred after {a.timeout} s")
            time.sleep(1)
        log(f"fill: {total} entries deferred after {time.monotonic() - t0:.0f} s")
    finally:
        node.stop()


def start_sink(a):
    """Postfix's smtp-sink on the smarthost port: the relay destination is back."""
    sink = subprocess.Popen(
        [a.smtp_sink, "-u", "nobody", f"127.0.0.1:{SMARTHOST}", "1024"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    time.sleep(0.5)
    if sink.poll() is not None:
        raise SystemExit(f"smtp-sink did not start on {SMARTHOST}")
    return sink


def drain(a, dsn: str) -> dict:
    local = a.deliver == "maildir"
    node = Node(a.venv, f"{a.dir}/drain", node_toml(a, "drain", 20222, dsn, local=local))
    if local:
        node.admin("user", "add", "--password-stdin", "to@bench.test", stdin=os.urandom(12).hex())
    queued = int(psql(a.admin_dsn, a.db, "SELECT count(*) FROM queue_entries"))
    log("flush: " + node.admin("queue", "flush").strip())
    sink = None if local else start_sink(a)
    samples = []
    out = open(a.samples, "w")
    out.write("t_s,rss_kb,queued\n")
    log(f"drain: starting the drain node ({a.deliver}) on {queued} queued entries")
    t0 = time.monotonic()
    try:
        node.start(20223)
        deadline = t0 + a.timeout
        tail = 0
        while tail <= a.tail:
            t = time.monotonic() - t0
            left = int(psql(a.admin_dsn, a.db, "SELECT count(*) FROM queue_entries"))
            samples.append((round(t, 2), node.rss_kb(), left))
            out.write(",".join(map(str, samples[-1])) + "\n")
            out.flush()
            if len(samples) % 60 == 0:
                log(f"drain: t={t:.0f}s rss={samples[-1][1]} kB queued={left}")
            if left == 0:
                tail += 1  # a few samples after the queue is empty: does memory come down?
            if node.proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(max(0.0, a.interval - (time.monotonic() - t0 - t)))
        dead = int(
            psql(a.admin_dsn, a.db, "SELECT count(*) FROM queue_entries WHERE status = 'dead'")
        )
    finally:
        node.stop()
        out.close()
        if sink is not None:
            os.killpg(sink.pid, signal.SIGTERM)
            sink.wait(10)
    return {"deliver": a.deliver, "dead": dead, **summarize(samples, queued)}


def summarize(samples, queued: int) -> dict:
    during = [s for s in samples if s[2] > 0 and s[1]]
    empty_at = next((s[0] for s in samples if s[2] == 0), None)
    out = {"messages": queued, "samples": len(samples), "drain_s": empty_at}
    if empty_at:
        out["drain_msgs_per_s"] = round(queued / empty_at, 1)
        # the middle 80% of the messages: start-up and the tail excluded
        hi = next((s for s in samples if s[2] <= queued * 0.9), None)
        lo = next((s for s in samples if s[2] <= queued * 0.1), None)
        if hi and lo and lo[0] > hi[0]:
            out["middle80_msgs_per_s"] = round((hi[2] - lo[2]) / (lo[0] - hi[0]), 1)
    rss = [s[1] for s in during]
    if rss:
        k = max(1, len(rss) // 10)
        out.update(
            rss_min_kb=min(rss),
            rss_median_kb=int(statistics.median(rss)),
            rss_max_kb=max(rss),
            rss_first10pct_median_kb=int(statistics.median(rss[:k])),
            rss_last10pct_median_kb=int(statistics.median(rss[-k:])),
        )
        after = [s[1] for s in samples if s[2] == 0 and s[1]]
        if after:
            out["rss_after_empty_kb"] = after[-1]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=100_000, help="messages to queue (default 100000)")
    ap.add_argument("--size", type=int, default=4096, help="message size (smtp-source -l)")
    ap.add_argument("--db", default="mta_bench_drain")
    ap.add_argument("--admin-dsn", default=os.environ.get(
        "PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"))  # fmt: skip
    ap.add_argument("--venv", default=os.environ.get("MTA_VENV", os.path.join(REPO, ".venv")))
    ap.add_argument("--dir", default="/tmp/mta-bench-drain")
    ap.add_argument("--samples", default=None, help="CSV of the samples (default DIR/samples.csv)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--tail", type=int, default=5, help="samples after the queue is empty")
    ap.add_argument("--timeout", type=float, default=3600, help="bound of the fill and the drain")
    ap.add_argument("--skip-fill", action="store_true", help="drain what is already in --db")
    ap.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    ap.add_argument("--smtp-sink", default="/usr/sbin/smtp-sink")
    ap.add_argument(
        "--deliver", choices=("relay", "maildir"), default="relay",
        help="drain by relaying to smtp-sink (default) or into a local Maildir",
    )  # fmt: skip
    a = ap.parse_args()
    a.samples = a.samples or os.path.join(a.dir, "samples.csv")
    os.makedirs(a.dir, exist_ok=True)
    dsn = a.admin_dsn.rsplit("/", 1)[0] + "/" + a.db
    if not a.skip_fill:
        psql(a.admin_dsn, None, f"DROP DATABASE IF EXISTS {a.db}")
        psql(a.admin_dsn, None, f"CREATE DATABASE {a.db}")
        fill(a, dsn)
    result = drain(a, dsn)
    print(json.dumps(result, indent=1))
    log(f"samples in {a.samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
