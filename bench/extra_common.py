"""Shared pieces of the submission (issue #3) and outbound (issue #4) benchmark shapes.

The reference harness (bench_target.py) is reused, not changed: its Target class starts a
foreground command in its own session and stops it by its own pid / process group (or a
--stop command such as `postfix -c DIR stop`), and tree()/mem_of()/cpu_of() read a
process tree's RSS, PSS and CPU from /proc.  This module adds the mta config for a
bench instance, a peak-memory sampler and a plain side-by-side table.
"""
import os
import subprocess
import sys
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_target as bt  # noqa: E402

REPO = os.path.dirname(HERE)
MTA_VENV = os.environ.get("MTA_VENV", os.path.join(REPO, ".venv"))
SCALE = float(os.environ.get("SCALE", "1"))
RESULTS = os.environ.get("RESULTS", "/tmp/benchresults")


def log(msg):
    print("[%s %s] %s" % (os.path.basename(sys.argv[0]), time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def target(name, addr, start, stop=None, pidfile=None, start_timeout=60):
    """A bench_target.Target for a command (run with bash, in its own session)."""
    a = types.SimpleNamespace(name=name, addr=addr, start=start, stop=stop, pidfile=pidfile, pid=None,
                              logdir=os.path.join(RESULTS, "logs"), start_timeout=start_timeout)
    return bt.Target(a)


def mta_setup(datadir, body, users=()):
    """Write DATADIR.toml (a fresh DATADIR) and create users; return the config path.

    users: (address, password) pairs, added with `mta-admin user add --password-stdin`.
    """
    for tool in ("twistd", "mta-admin"):
        if not os.access(os.path.join(MTA_VENV, "bin", tool), os.X_OK):
            sys.exit("no %s/bin/%s: run `make venv` first" % (MTA_VENV, tool))
    subprocess.run(["rm", "-rf", datadir], check=True)
    os.makedirs(datadir)
    cfg = datadir + ".toml"
    with open(cfg, "w") as f:
        f.write('hostname = "mta.bench.test"\ndatadir = "%s"\n' % datadir + body)
    admin = [os.path.join(MTA_VENV, "bin", "mta-admin"), "--config", cfg]
    subprocess.run(admin + ["check-config"], check=True, stdout=subprocess.DEVNULL)
    for addr, password in users:
        subprocess.run(admin + ["user", "add", "--password-stdin", addr], input=password.encode(), check=True,
                       stdout=subprocess.DEVNULL)
    return cfg


def mta_start_cmd(cfg):
    return "exec %s/bin/twistd -n --pidfile= mta --config %s" % (MTA_VENV, cfg)


class PeakSampler:
    """Samples RSS and PSS of a target's process tree every `interval` s; keeps the peaks."""

    def __init__(self, tgt, interval=0.2):
        self.tgt, self.interval = tgt, interval
        self.peak_rss = self.peak_pss = self.peak_procs = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            m = bt.mem_of(self.tgt.pids())
            self.peak_rss = max(self.peak_rss, m["rss_kb"])
            self.peak_pss = max(self.peak_pss, m["pss_kb"])
            self.peak_procs = max(self.peak_procs, m["procs"])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def private_kb(pids):
    """Private_Clean + Private_Dirty (KB) summed over pids: memory no other process shares,
    so unlike PSS it does not move when unrelated processes map the same libraries."""
    total = 0
    for p in pids:
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def wait_for(pred, timeout, poll=0.05):
    """Poll pred() until true or timeout; return the time it became true (monotonic) or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(poll)
    return None


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "%.1f" % v if abs(v) >= 10 else "%.2f" % v
    return str(v)


def print_table(title, rows, columns, notes=()):
    """rows: [(label, key)], columns: [(name, dict)] -> one aligned table on stdout."""
    w0 = max(len(r[0]) for r in rows)
    widths = [max(12, len(name)) for name, _ in columns]
    print()
    print("== %s  %s  %d cpus  load %s" % (title, time.strftime("%Y-%m-%d %H:%M:%S"), os.cpu_count(),
                                          " ".join("%.2f" % x for x in os.getloadavg())))
    print("%-*s  %s" % (w0, "", "  ".join("%*s" % (w, n) for w, (n, _) in zip(widths, columns))))
    for label, key in rows:
        print("%-*s  %s" % (w0, label, "  ".join("%*s" % (w, fmt(d.get(key))) for w, (_, d) in zip(widths, columns))))
    for n in notes:
        print("note: " + n)
    sys.stdout.flush()
