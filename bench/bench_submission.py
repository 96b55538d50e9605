#!/usr/bin/env python3
"""AUTH + TLS submission benchmark (issue #3): `twistd mta` and a private Postfix, one table.

For each target, in one run:
  load  20 sessions at once, each STARTTLS + AUTH PLAIN once, then 50 messages of 4 KB
        one at a time (submission_tls.py load): msgs/s, p50/p95/p99 of MAIL -> 250 after
        the dot, errors, server CPU per message, and the time until all are in the Maildir.
  idle  a fresh server process, then 500 connections each EHLO + STARTTLS handshake + EHLO,
        held open (submission_tls.py idle): (RSS after - RSS before)/N and the same for PSS,
        summed over the server's whole process tree (master + smtpd's for Postfix).

mta: submission listener 127.0.0.1:$MTA_PORT (20040) tls = "required", auth = "required",
the production Argon2id defaults of mta/config.py AuthConfig, delivery into the user's
Maildir.  Postfix: bench/pf_private.sh submission on 127.0.0.1:$PF_PORT (20045), STARTTLS
required, AUTH via Cyrus sasldb when saslpasswd2 is installed (else TLS only, said in the
table), virtual(8) delivery into a Maildir.  SCALE multiplies messages and connections.
"""
import json
import os
import secrets
import subprocess
import sys
import time

import extra_common as ec
from extra_common import bt, log

MTA_PORT = int(os.environ.get("MTA_PORT", "20040"))
PF_PORT = int(os.environ.get("PF_PORT", "20045"))
DATADIR = os.environ.get("DATADIR", "/tmp/mta-subbench")
PF_DIR = "/tmp/benchpf-sub"
USER = "user@bench.test"
SESSIONS = int(os.environ.get("SESSIONS", "20"))
PER_SESSION = max(1, round(50 * ec.SCALE))
IDLE_N = max(10, round(500 * ec.SCALE))
TARGETS = os.environ.get("TARGETS", "mta postfix").split()
PY = sys.executable
CLIENT = os.path.join(ec.HERE, "submission_tls.py")


def run_load(tgt, maildir, password, no_auth):
    res = {}
    cmd = [PY, CLIENT, "load", tgt.a.addr, "-c", str(SESSIONS), "-m", str(PER_SESSION), "-l", "4096",
           "--user", USER]
    if no_auth:
        cmd.append("--no-auth")
    log("%s load: %s" % (tgt.a.name, " ".join(cmd[1:])))
    before = bt.maildir_count(maildir)
    cpu0 = bt.cpu_of(tgt.pids())
    t0 = time.monotonic()
    env = dict(os.environ, BENCH_PASSWORD=password)
    p = subprocess.run(cmd, capture_output=True, timeout=120 + 2 * SESSIONS * PER_SESSION, env=env)
    lines = [x for x in p.stdout.decode().splitlines() if x.startswith("{")]
    if not lines:
        return {"error": "client: rc %s %s" % (p.returncode, p.stderr.decode()[-300:])}
    out = json.loads(lines[-1])
    cpu1 = bt.cpu_of(tgt.pids())
    res.update(msgs_s=out["msgs_per_s"], p50=out["p50_ms"], p95=out["p95_ms"], p99=out["p99_ms"],
               max=out["max_ms"], setup_p50=out["setup_p50_ms"], setup_max=out["setup_max_ms"], sent=out["sent"], errors=out["errors"], client_cpu=out["client_cpu_s"])
    if out["error_samples"]:
        res["error_samples"] = out["error_samples"]
    if out["sent"]:
        res["cpu_ms_msg"] = round((cpu1 - cpu0) * 1000 / out["sent"], 2)
    done = ec.wait_for(lambda: bt.maildir_count(maildir) - before >= out["sent"], 300)
    res["delivered"] = bt.maildir_count(maildir) - before
    if done is not None and out["sent"]:
        res["deliver_msgs_s"] = round(out["sent"] / (done - t0), 1)
    return res


def run_idle(tgt):
    log("%s idle: restart for a clean baseline, then %d TLS connections" % (tgt.a.name, IDLE_N))
    tgt.stop()
    time.sleep(0.5)
    tgt.start()
    time.sleep(2.0)
    before = bt.mem_of(tgt.pids())
    before_priv = ec.private_kb(tgt.pids())
    cmd = [PY, CLIENT, "idle", tgt.a.addr, "-n", str(IDLE_N), "--hold", "300", "--timeout", "30"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    info = {}
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line or line.strip() == b"READY":
                break
            if line.startswith(b"{"):
                info = json.loads(line)
        time.sleep(2.0)  # let the server settle (Postfix forks, Python frees handshake buffers)
        after = bt.mem_of(tgt.pids())
        after_priv = ec.private_kb(tgt.pids())
    finally:
        p.stdin.close()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    ok = info.get("ok", 0)
    res = {"idle_ok": ok, "idle_failed": info.get("failed"), "idle_connect_s": info.get("connect_s"),
           "rss_before_mb": round(before["rss_kb"] / 1024, 1), "procs_idle": after["procs"]}
    if info.get("errors"):
        res["idle_errors"] = info["errors"]
    if ok:
        res["rss_kb_conn"] = round((after["rss_kb"] - before["rss_kb"]) / ok, 1)
        res["pss_kb_conn"] = round((after["pss_kb"] - before["pss_kb"]) / ok, 1)
        res["priv_kb_conn"] = round((after_priv - before_priv) / ok, 1)
    return res


def bench(tgt, maildir, password, no_auth):
    res = {"auth": "no (TLS only)" if no_auth else "PLAIN"}
    try:
        tgt.start()
        res.update(run_load(tgt, maildir, password, no_auth))
        res.update(run_idle(tgt))
    except (subprocess.TimeoutExpired, SystemExit) as e:
        res["error"] = str(e)
        log("%s: %s" % (tgt.a.name, e))
    finally:
        tgt.stop()
    log("%s: %s" % (tgt.a.name, json.dumps(res)))
    return res


def main():
    os.makedirs(ec.RESULTS, exist_ok=True)
    password = secrets.token_urlsafe(18)
    columns = []
    notes = ["%d sessions x %d messages of 4 KB, STARTTLS + AUTH once per session; idle: %d TLS connections"
             % (SESSIONS, PER_SESSION, IDLE_N),
             "msgs/s = messages / wall time of the whole load, session setup (TLS + AUTH: mta's Argon2id "
             "production cost) included; at SCALE < 1 the setup weighs more",
             "session setup = connect, EHLO, STARTTLS, EHLO, AUTH PLAIN (all 20 sessions start at once)",
             "idle: a fresh server, connections held after handshake + EHLO; RSS summed over the process "
             "tree counts shared pages once per process (Postfix forks one smtpd per connection): compare PSS, or "
             "private (Private_Clean + Private_Dirty), which other processes on this shared machine cannot move"]
    for name in TARGETS:
        if name == "mta":
            cfg = ec.mta_setup(DATADIR, """\
local_domains = ["bench.test"]
postmaster = "postmaster@bench.test"
workers = %s

[[listener]]
name = "submission"
address = "127.0.0.1:%d"
tls = "required"
auth = "required"

[limits]
max_connections = 4000
max_connections_per_ip = 4000
idle_timeout = 600.0

[http]
address = "127.0.0.1:%d"

[log]
format = "json"
level = "warn"
""" % (os.environ.get("WORKERS", "0"), MTA_PORT, MTA_PORT + 1), users=[(USER, password)])
            tgt = ec.target("mta", "127.0.0.1:%d" % MTA_PORT, ec.mta_start_cmd(cfg))
            maildir = os.path.join(DATADIR, "mail", "bench.test", "user")
            columns.append(("mta", bench(tgt, maildir, password, False)))
        elif name == "postfix":
            pf = ["bash", os.path.join(ec.HERE, "pf_private.sh"), "submission"]
            env = dict(os.environ, BENCH_PASSWORD=password, PF_PORT=str(PF_PORT))
            sasl = subprocess.run(pf + ["sasl"], capture_output=True, env=env).stdout.strip() == b"yes"
            subprocess.run(pf + ["purge"], env=env, check=True)
            os.environ.update(BENCH_PASSWORD=password, PF_PORT=str(PF_PORT))  # for the start command
            tgt = ec.target("postfix-sub", "127.0.0.1:%d" % PF_PORT, " ".join(pf + ["start"]),
                            stop=" ".join(pf + ["stop"]), pidfile=PF_DIR + "/queue/pid/master.pid")
            columns.append(("postfix", bench(tgt, PF_DIR + "/mail/Maildir", password, not sasl)))
            if not sasl:
                notes.append("Postfix without AUTH: saslpasswd2 (apt-get install sasl2-bin) missing or PF_NO_SASL set")
            subprocess.run(pf + ["purge"], env=env)
        else:
            sys.exit("unknown target %s (mta, postfix)" % name)
    for _, d in columns:
        for k in ("error", "error_samples", "idle_errors"):
            if d.get(k):
                notes.append("%s: %s" % (k, d[k]))
    with open(os.path.join(ec.RESULTS, "submission-%s.jsonl" % time.strftime("%Y%m%d-%H%M%S")), "w") as f:
        for n, d in columns:
            f.write(json.dumps(dict(d, target=n, scale=ec.SCALE)) + "\n")
    ec.print_table("AUTH + TLS submission (issue #3)", [
        ("AUTH", "auth"),
        ("messages sent", "sent"),
        ("errors", "errors"),
        ("msgs/s (accepted)", "msgs_s"),
        ("p50 ms MAIL->250 dot", "p50"),
        ("p95 ms", "p95"),
        ("p99 ms", "p99"),
        ("max ms", "max"),
        ("session setup p50 ms", "setup_p50"),
        ("session setup max ms", "setup_max"),
        ("server CPU ms/msg", "cpu_ms_msg"),
        ("client CPU s", "client_cpu"),
        ("delivered", "delivered"),
        ("delivered msgs/s", "deliver_msgs_s"),
        ("idle TLS conns held", "idle_ok"),
        ("idle RSS KB/conn", "rss_kb_conn"),
        ("idle PSS KB/conn", "pss_kb_conn"),
        ("idle private KB/conn", "priv_kb_conn"),
        ("RSS before idle MB", "rss_before_mb"),
        ("processes while idle", "procs_idle"),
    ], columns, notes)


if __name__ == "__main__":
    main()
