#!/usr/bin/env python3
"""Outbound relay benchmark (issue #4): `twistd mta` and a private Postfix relay the same
5,000 messages (4 KB) to the same local smtp-sink; one table.

For each target: a fresh smtp-sink (`smtp-sink -u nobody -c 127.0.0.1:$SINK_PORT 1024`;
-c prints "... mesg=N" after every message, which we read from its stdout), a fresh server,
then `smtp-source -s 20 -m 5000 -l 4096 -t to@remote.test` into it as fast as it accepts.
Reported: injection msgs/s, the time from the first message until the sink has counted all
5,000 (delivered msgs/s), and the peak RSS/PSS of the server's process tree (sampled every
0.2 s), plus server CPU ms per message.

mta: smtp listener 127.0.0.1:$MTA_PORT (20050), relay_networks = ["127.0.0.0/8"],
[relay] smarthost = "127.0.0.1:$SINK_PORT" (20059).  Postfix: bench/pf_private.sh relay on
127.0.0.1:$PF_PORT (20055), relayhost = [127.0.0.1]:$SINK_PORT,
default_destination_concurrency_limit = 20.  SCALE multiplies the message count.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time

import extra_common as ec
from extra_common import bt, log

MTA_PORT = int(os.environ.get("MTA_PORT", "20050"))
PF_PORT = int(os.environ.get("PF_PORT", "20055"))
SINK_PORT = int(os.environ.get("SINK_PORT", "20059"))
DATADIR = os.environ.get("DATADIR", "/tmp/mta-outbench")
PF_DIR = "/tmp/benchpf-relay"
N = max(10, round(5000 * ec.SCALE))
TARGETS = os.environ.get("TARGETS", "mta postfix").split()
DELIVER_TIMEOUT = float(os.environ.get("DELIVER_TIMEOUT", "600"))


class Sink:
    """smtp-sink in its own session; a thread follows its "mesg=N" counter."""

    def __init__(self):
        self.count = 0
        self.first = None  # monotonic time the first message was counted
        self.proc = None

    def start(self):
        if bt.port_open("127.0.0.1", SINK_PORT):
            sys.exit("port %d already in use" % SINK_PORT)
        cmd = ["/usr/sbin/smtp-sink", "-u", "nobody", "-c", "127.0.0.1:%d" % SINK_PORT, "1024"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        threading.Thread(target=self._follow, daemon=True).start()
        if ec.wait_for(lambda: bt.port_open("127.0.0.1", SINK_PORT), 10) is None:
            self.stop()
            sys.exit("smtp-sink did not listen on %d" % SINK_PORT)

    def _follow(self):
        buf = b""
        pat = re.compile(rb"mesg=(\d+)")
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            buf = (buf + chunk)[-256:]
            found = pat.findall(buf)
            if found:
                n = int(found[-1])
                if n and self.first is None:
                    self.first = time.monotonic()
                self.count = n

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def bench(tgt):
    res = {"messages": N}
    sink = Sink()
    sink.start()
    try:
        tgt.start()
        time.sleep(0.5)
        res["rss_start_mb"] = round(bt.mem_of(tgt.pids())["rss_kb"] / 1024, 1)
        cpu0 = bt.cpu_of(tgt.pids())
        cmd = ["/usr/sbin/smtp-source", "-s", "20", "-m", str(N), "-l", "4096", "-f", "from@example.com",
               "-t", "to@remote.test", "-M", "client.bench.test", tgt.a.addr]
        log("%s: %s" % (tgt.a.name, " ".join(cmd)))
        with ec.PeakSampler(tgt) as peak:
            t0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, timeout=DELIVER_TIMEOUT)
            t_inj = time.monotonic()
            res["inject_msgs_s"] = round(N / (t_inj - t0), 1)
            if p.returncode:
                res["inject_error"] = "smtp-source rc %d: %s" % (p.returncode, p.stderr.decode()[-200:])
            done = ec.wait_for(lambda: sink.count >= N, DELIVER_TIMEOUT - (t_inj - t0), poll=0.02)
            res["relayed"] = sink.count
            if done is not None:
                res["relay_s"] = round(done - t0, 2)
                res["relay_msgs_s"] = round(N / (done - t0), 1)
                res["tail_after_inject_s"] = round(done - t_inj, 2)
            else:
                res["error"] = "sink counted %d of %d within %ss" % (sink.count, N, DELIVER_TIMEOUT)
            if sink.first is not None:
                res["first_relayed_s"] = round(sink.first - t0, 2)
        cpu1 = bt.cpu_of(tgt.pids())
        res.update(peak_rss_mb=round(peak.peak_rss / 1024, 1), peak_pss_mb=round(peak.peak_pss / 1024, 1),
                   peak_procs=peak.peak_procs, cpu_ms_msg=round((cpu1 - cpu0) * 1000 / N, 2))
    except (subprocess.TimeoutExpired, SystemExit) as e:
        res["error"] = str(e)
        log("%s: %s" % (tgt.a.name, e))
    finally:
        tgt.stop()
        sink.stop()
    log("%s: %s" % (tgt.a.name, json.dumps(res)))
    return res


def main():
    os.makedirs(ec.RESULTS, exist_ok=True)
    for tool in ("/usr/sbin/smtp-sink", "/usr/sbin/smtp-source"):
        if not os.access(tool, os.X_OK):
            sys.exit("%s missing: apt-get install postfix (choose 'No configuration')" % tool)
    columns = []
    notes = ["%d messages of 4 KB injected with smtp-source -s 20, relayed to smtp-sink on 127.0.0.1:%d"
             % (N, SINK_PORT),
             "relay msgs/s = messages / (time from the start of injection until the sink counted all)",
             "server CPU of Postfix excludes processes that exited during the run (smtpd/smtp/cleanup "
             "reused, mostly alive); peak RSS sums every process, PSS counts shared pages once"]
    for name in TARGETS:
        if name == "mta":
            cfg = ec.mta_setup(DATADIR, """\
local_domains = ["bench.test"]
relay_networks = ["127.0.0.0/8"]
postmaster = "postmaster@bench.test"
workers = %s

[[listener]]
name = "smtp"
address = "127.0.0.1:%d"
tls = "none"
auth = "none"

[limits]
max_connections = 4000
max_connections_per_ip = 4000

[relay]
smarthost = "127.0.0.1:%d"

[http]
address = "127.0.0.1:%d"

[log]
format = "json"
level = "warn"
""" % (os.environ.get("WORKERS", "0"), MTA_PORT, SINK_PORT, MTA_PORT + 1))
            tgt = ec.target("mta-out", "127.0.0.1:%d" % MTA_PORT, ec.mta_start_cmd(cfg))
            columns.append(("mta", bench(tgt)))
        elif name == "postfix":
            pf = ["bash", os.path.join(ec.HERE, "pf_private.sh"), "relay"]
            os.environ.update(PF_PORT=str(PF_PORT), SINK_PORT=str(SINK_PORT))
            subprocess.run(pf + ["purge"], check=True)
            tgt = ec.target("postfix-relay", "127.0.0.1:%d" % PF_PORT, " ".join(pf + ["start"]),
                            stop=" ".join(pf + ["stop"]), pidfile=PF_DIR + "/queue/pid/master.pid")
            columns.append(("postfix", bench(tgt)))
            subprocess.run(pf + ["purge"])
        else:
            sys.exit("unknown target %s (mta, postfix)" % name)
    for n, d in columns:
        for k in ("error", "inject_error"):
            if d.get(k):
                notes.append("%s %s: %s" % (n, k, d[k]))
    with open(os.path.join(ec.RESULTS, "outbound-%s.jsonl" % time.strftime("%Y%m%d-%H%M%S")), "w") as f:
        for n, d in columns:
            f.write(json.dumps(dict(d, target=n, scale=ec.SCALE)) + "\n")
    ec.print_table("Outbound relay to smtp-sink (issue #4)", [
        ("messages", "messages"),
        ("inject msgs/s", "inject_msgs_s"),
        ("relayed (sink count)", "relayed"),
        ("first relayed after s", "first_relayed_s"),
        ("all relayed after s", "relay_s"),
        ("relay msgs/s", "relay_msgs_s"),
        ("tail after injection s", "tail_after_inject_s"),
        ("server CPU ms/msg", "cpu_ms_msg"),
        ("RSS at start MB", "rss_start_mb"),
        ("peak RSS MB", "peak_rss_mb"),
        ("peak PSS MB", "peak_pss_mb"),
        ("peak processes", "peak_procs"),
    ], columns, notes)


if __name__ == "__main__":
    main()
