#!/usr/bin/env python3
"""The checks benchmark (issue #12 "Performance"): `twistd mta` under L1-like load
with its checks off and on, beside the rate the scanners sustain on their own.

Run it through bench/checks_bench.sh, which picks the Python of the mta virtualenv
(this script imports mta.config and dkimpy from it).  In one run:

1. It writes a ~4 KB MIME message from alice@sender.test (a text part and a small
   text attachment), DKIM-signed (rsa-sha256, selector `bench`), and a DNS zone for
   sender.test with SPF (`ip4:127.0.0.1 -all`), the DKIM key and DMARC (`p=none`).
2. It starts, on loopback and as its own children: spamd (`--local`, its own Bayes
   path), clamd (its own config and a tiny signature database, as the tests do) and,
   when an SPF/DKIM/DMARC variant runs, an authoritative DNS server for that zone
   (twisted.names, `twistd dns --pyzone`, from the mta virtualenv).
3. For each variant of VARIANTS it starts a fresh `twistd -n mta` (its own datadir,
   Maildir delivery to to@bench.test, `relay_networks = []` so every check applies)
   and runs `checks_load.py smtp` (C persistent connections, one command at a time:
   the L1 shape) for DURATION seconds:
     off    no checks
     scan   [checks] spamd + clamd
     auth   [checks] spf = dkim = dmarc = "tag", [dns] nameservers = the local server
     all    spamd + clamd + blocked_attachments + spf/dkim/dmarc "tag"
   `auth` needs the SPF/DKIM/DMARC checks (issue #12, another branch): while the
   build does not know those keys, `auth` is skipped and `all` runs without them,
   and the table says so.  One delivered message is read back to prove the checks
   ran (X-Spam-Status for spamd, Authentication-Results for SPF/DKIM/DMARC).
4. The scanners' own ceiling with the same message and concurrency (CEILINGS):
   `spamd` and `clamd` (our asyncio clients of checks_load.py), `spamc` and
   `clamdscan` (the binaries, one process per message).
5. One table: msg/s, p50, p99, errors; then the issue's ratios.

Everything listens on 127.0.0.1 (ports PORT..PORT+5) and writes under DIR; every
process is stopped by its own pid.  Raw results: RESULTS/checks-STAMP.jsonl.
"""

import base64
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MTA_VENV = os.environ.get("MTA_VENV", os.path.join(REPO, ".venv"))
DIR = os.environ.get("DIR", "/tmp/mta-checksbench")
RESULTS = os.environ.get("RESULTS", "/tmp/benchresults")
DURATION = float(os.environ.get("DURATION", "20"))
CONCURRENCY = int(os.environ.get("CONCURRENCY", "20"))
VARIANTS = os.environ.get("VARIANTS", "off scan auth all").split()
CEILINGS = os.environ.get("CEILINGS", "spamd clamd spamc clamdscan").split()
PORT = int(os.environ.get("PORT", "20060"))
WORKERS = int(os.environ.get("WORKERS", "0"))
SPAMD_CHILDREN = int(os.environ.get("SPAMD_CHILDREN", "4"))
SMTP, HTTP, SPAMD, CLAMD, DNS = PORT, PORT + 1, PORT + 3, PORT + 4, PORT + 5
AUTH_KEYS = ("spf", "dkim", "dmarc")
LABELS = {
    "off": "checks off",
    "scan": "spamd + clamd",
    "auth": "SPF + DKIM + DMARC (tag)",
    "all": "all checks",
}
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def log(msg):
    print("[checks_bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def auth_supported():
    """Whether this build's config knows [checks] spf/dkim/dmarc (not just reserves them)."""
    sys.path.insert(0, REPO)
    from mta.config import build_config

    try:
        checks = build_config({"checks": dict.fromkeys(AUTH_KEYS, "tag")}).checks
    except Exception as e:  # noqa: BLE001 (any refusal means: not there yet)
        log("this build refuses [checks] spf/dkim/dmarc: %s" % e)
        return False
    return all(getattr(checks, key, None) == "tag" for key in AUTH_KEYS)


# -- the message and the zone ----------------------------------------------------------


def make_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(public).decode()


def make_message(pem):
    import dkim

    text = (
        "Hello Bob,\r\n\r\n"
        "here are the notes from Tuesday's planning meeting. We agreed to move the\r\n"
        "release to the second week of the month, so that the documentation team has\r\n"
        "time to review the new configuration chapter. Carol will send the updated\r\n"
        "schedule by Friday; please tell her if the dates do not work for your team.\r\n\r\n"
    ) * 4 + "Thanks,\r\nAlice\r\n"
    notes = ("- item %d: check the figures in the quarterly report and reply to Dave\n" % i for i in range(24))
    attachment = base64.encodebytes("".join(notes).encode()).decode().replace("\n", "\r\n")
    body = (
        "This is a multi-part message in MIME format.\r\n\r\n"
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
        "--b1\r\nContent-Type: text/plain; name=notes.txt\r\n"
        'Content-Disposition: attachment; filename="notes.txt"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n" + attachment + "--b1--\r\n"
    )
    head = (
        "From: Alice Example <alice@sender.test>\r\nTo: <to@bench.test>\r\n"
        "Subject: Notes from the planning meeting\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <planning-notes-1@sender.test>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    )
    message = (head + body).encode()
    headers = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"]
    signature = dkim.sign(
        message, b"bench", b"sender.test", pem, include_headers=headers,
        canonicalize=(b"relaxed", b"relaxed"), linesep=b"\r\n",
    )
    return signature + message


def write_zone(path, public):
    dkim_txt = "v=DKIM1; k=rsa; p=" + public
    chunks = ", ".join(repr(dkim_txt[i : i + 250].encode()) for i in range(0, len(dkim_txt), 250))
    with open(path, "w") as f:
        f.write(
            "zone = [\n"
            "    SOA('sender.test', mname='ns.sender.test', rname='hostmaster.sender.test', serial=1,\n"
            "        refresh=3600, retry=600, expire=86400, minimum=300, ttl=300),\n"
            "    NS('sender.test', 'ns.sender.test', ttl=300),\n"
            "    A('ns.sender.test', '127.0.0.1', ttl=300),\n"
            "    A('sender.test', '127.0.0.1', ttl=300),\n"
            "    MX('sender.test', 10, 'sender.test', ttl=300),\n"
            "    TXT('sender.test', b'v=spf1 ip4:127.0.0.1 -all', ttl=300),\n"
            "    TXT('bench._domainkey.sender.test', %s, ttl=300),\n"
            "    TXT('_dmarc.sender.test', b'v=DMARC1; p=none; adkim=r; aspf=r', ttl=300),\n"
            "]\n" % chunks
        )


# -- the daemons -----------------------------------------------------------------------


class Processes:
    """Our children, stopped by their own pid (SIGTERM, then SIGKILL after 30 s)."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kw):
        out = open(os.path.join(DIR, name + ".out"), "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        proc.out = out
        proc.name = name
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        proc.out.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_for(proc, check, what, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("%s did not come up: see %s" % (what, proc.out.name))


def ask(port, request, answer):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        return answer in s.recv(200)


def run_as_daemon_user(directories, user):
    if os.geteuid() != 0:
        return []
    entry = pwd.getpwnam(user)
    for d in directories:
        os.chown(d, entry.pw_uid, entry.pw_gid)
    return ["--username=" + user, "--groupname=" + __import__("grp").getgrgid(entry.pw_gid).gr_name]


def start_spamd(procs):
    home = os.path.join(DIR, "spamd")
    os.makedirs(os.path.join(home, "bayes"))
    argv = [
        shutil.which("spamd") or "/usr/sbin/spamd",
        "--listen=127.0.0.1:%d" % SPAMD,
        "--allowed-ips=127.0.0.1",
        "--local",
        "--nouser-config",
        "--helper-home-dir=" + home,
        "--min-children=2",
        "--max-children=%d" % SPAMD_CHILDREN,
        "--min-spare=1",
        "--max-spare=%d" % SPAMD_CHILDREN,
        "--syslog=" + os.path.join(home, "spamd.log"),
        "--cf=bayes_path %s/bayes/bayes" % home,
    ]
    argv += run_as_daemon_user([home, os.path.join(home, "bayes")], "debian-spamd")
    proc = procs.start("spamd", argv, cwd=home)
    wait_for(proc, lambda: ask(SPAMD, b"PING SPAMC/1.5\r\n\r\n", b"PONG"), "spamd")
    return proc


def start_clamd(procs):
    import hashlib

    d = os.path.join(DIR, "clamd")
    os.makedirs(os.path.join(d, "db"))
    with open(os.path.join(d, "db", "bench.hdb"), "w") as f:
        f.write("%s:%d:Bench.EICAR\n" % (hashlib.md5(EICAR).hexdigest(), len(EICAR)))  # noqa: S324
    conf = os.path.join(d, "clamd.conf")
    with open(conf, "w") as f:
        f.write(
            "Foreground yes\nDatabaseDirectory %s/db\nTCPSocket %d\nTCPAddr 127.0.0.1\n"
            "LogFile %s/clamd.log\nMaxThreads %s\nStreamMaxLength 25M\nSelfCheck 0\n"
            % (d, CLAMD, d, os.environ.get("CLAMD_THREADS", "10"))
        )
    if os.geteuid() == 0:
        os.chmod(d, 0o755)  # clamd drops to its own user and must read its files
    proc = procs.start("clamd", [shutil.which("clamd") or "/usr/sbin/clamd", "-c", conf], cwd=d)
    wait_for(proc, lambda: ask(CLAMD, b"zPING\0", b"PONG"), "clamd")
    return proc, conf


def start_dns(procs, zone):
    import dns.exception
    import dns.message
    import dns.query

    argv = [os.path.join(MTA_VENV, "bin", "twistd"), "-n", "--pidfile=", "dns",
            "--interface=127.0.0.1", "--port=%d" % DNS, "--pyzone=" + zone]
    proc = procs.start("dns", argv, cwd=DIR)

    def answers():
        query = dns.message.make_query("sender.test", "TXT")
        try:
            return bool(dns.query.udp(query, "127.0.0.1", port=DNS, timeout=1).answer)
        except dns.exception.DNSException:
            return False

    wait_for(proc, answers, "the DNS server")
    return proc


# -- one mta variant --------------------------------------------------------------------


def variant_config(variant, datadir, with_auth):
    scan = variant in ("scan", "all")
    auth = variant in ("auth", "all") and with_auth
    lines = [
        'hostname = "mta.bench.test"',
        'datadir = "%s"' % datadir,
        'local_domains = ["bench.test"]',
        "relay_networks = []  # every check applies to 127.0.0.1",
        'postmaster = "postmaster@bench.test"',
        "workers = %d" % WORKERS,
        "",
        "[[listener]]",
        'name = "smtp"',
        'address = "127.0.0.1:%d"' % SMTP,
        'tls = "none"',
        'auth = "none"',
        "",
        "[limits]",
        "max_connections = 4000",
        "max_connections_per_ip = 4000",
        "idle_timeout = 600.0",
        "",
        "[http]",
        'address = "127.0.0.1:%d"' % HTTP,
        "",
        "[log]",
        'format = "json"',
        'level = "warn"',
        "",
        "[checks]",
    ]
    if scan:
        lines += ['spamd = "127.0.0.1:%d"' % SPAMD, 'clamd = "127.0.0.1:%d"' % CLAMD]
    if variant == "all":
        lines.append('blocked_attachments = ["exe", "scr", "js", "bat"]')
    if auth:
        lines += ['%s = "tag"' % key for key in AUTH_KEYS]
        lines += ["", "[dns]", 'nameservers = ["127.0.0.1:%d"]' % DNS]
    return "\n".join(lines) + "\n"


def first_delivered(maildir):
    for sub in ("new", "cur"):
        path = os.path.join(maildir, sub)
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else ():
            with open(os.path.join(path, name), "rb") as f:
                return f.read()
    return b""


def run_variant(procs, variant, message_path, with_auth):
    datadir = os.path.join(DIR, "data-" + variant)
    cfg = datadir + ".toml"
    with open(cfg, "w") as f:
        f.write(variant_config(variant, datadir, with_auth))
    admin = [os.path.join(MTA_VENV, "bin", "mta-admin"), "--config", cfg]
    subprocess.run(admin + ["check-config"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(admin + ["user", "add", "--no-password", "to@bench.test"], check=True, stdout=subprocess.DEVNULL)
    mta = procs.start("mta-" + variant, [os.path.join(MTA_VENV, "bin", "twistd"), "-n", "--pidfile=", "mta",
                                         "--config", cfg])
    try:
        wait_for(mta, lambda: ask(SMTP, b"", b"220"), "twistd mta (%s)" % variant, timeout=60)
        cpu = tree_cpu_seconds(mta.pid)
        result = load("smtp", "127.0.0.1:%d" % SMTP, message_path)
        cpu = tree_cpu_seconds(mta.pid) - cpu
        if result.get("ok"):
            # what the message costs the server, whatever else shares the cores
            result["cpu_ms"] = round(cpu * 1000 / result["ok"], 2)
    finally:
        procs.stop(mta)
    delivered = first_delivered(os.path.join(datadir, "mail", "bench.test", "to"))
    head = delivered.split(b"\r\n\r\n", 1)[0]
    result["spamd_tagged"] = b"X-Spam-Status:" in head
    result["auth_results"] = b"Authentication-Results:" in head
    shutil.rmtree(datadir, ignore_errors=True)
    return result


def tree_cpu_seconds(pid):
    """User + system CPU seconds of `pid` and its descendants (the worker processes)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, task)) as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def load(kind, target, message_path):
    argv = [sys.executable, os.path.join(HERE, "checks_load.py"), kind, target, "--message", message_path,
            "-c", str(CONCURRENCY), "--time-limit", str(DURATION)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=DURATION + 300)
    if not done.stdout.strip():
        raise SystemExit("checks_load.py %s failed: %s" % (kind, done.stderr[-2000:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table --------------------------------------------------------------------------


def table(rows, with_auth):
    width = max([len(r["label"]) for r in rows] + [10])
    line = "%-" + str(width) + "s %8s %8s %8s %7s %8s  %s"
    out = [line % ("", "msg/s", "p50 ms", "p99 ms", "errors", "CPU ms", "note")]
    by = {}
    for r in rows:
        by[r["row"]] = r
        out.append(line % (
            r["label"], r.get("msgs_per_s", "-"), r.get("p50_ms", "-"), r.get("p99_ms", "-"),
            r.get("errors", "-"), r.get("cpu_ms", "-"), r.get("note", "")))
    out.append("")

    def ratio(a, b, target, what):
        if a in by and b in by and by[b].get("msgs_per_s"):
            value = by[a]["msgs_per_s"] / by[b]["msgs_per_s"]
            out.append("%s: %.2f (target >= %.2f)" % (what, value, target))

    ratio("auth", "off", 0.60, "SPF+DKIM+DMARC / checks off")
    if by.get("auth", {}).get("cpu_ms") and by.get("off", {}).get("cpu_ms"):
        out.append("SPF+DKIM+DMARC, server CPU per message: %.2f ms vs %.2f ms with checks off"
                   " (ratio %.2f)" % (by["auth"]["cpu_ms"], by["off"]["cpu_ms"],
                                      by["off"]["cpu_ms"] / by["auth"]["cpu_ms"]))
    ceilings = [by[k] for k in ("ceiling-spamd", "ceiling-clamd") if k in by and by[k].get("msgs_per_s")]
    if "all" in by and ceilings:
        slowest = min(ceilings, key=lambda r: r["msgs_per_s"])
        by["ceiling"] = slowest
        ratio("all", "ceiling", 0.80, "all checks / the scanners' ceiling (%s)" % slowest["label"].strip())
    if not with_auth:
        out.append("(SPF/DKIM/DMARC: not in this build yet; `auth` skipped, `all` ran without them)")
    return "\n".join(out)


def main():
    for tool in ("twistd", "mta-admin"):
        if not os.access(os.path.join(MTA_VENV, "bin", tool), os.X_OK):
            raise SystemExit("no %s/bin/%s: run `make run` or `make test` first" % (MTA_VENV, tool))
    for port in (SMTP, HTTP, SPAMD, CLAMD, DNS):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise SystemExit("something already listens on 127.0.0.1:%d (set PORT=)" % port)
    with_auth = auth_supported()
    variants = [v for v in VARIANTS if v != "auth" or with_auth]
    if "auth" in VARIANTS and not with_auth:
        log("skipping `auth`: [checks] spf/dkim/dmarc are not implemented by this build yet")
    shutil.rmtree(DIR, ignore_errors=True)
    os.makedirs(DIR)
    os.chmod(DIR, 0o755)
    os.makedirs(RESULTS, exist_ok=True)
    pem, public = make_key()
    message_path = os.path.join(DIR, "message.eml")
    with open(message_path, "wb") as f:
        f.write(make_message(pem))
    zone = os.path.join(DIR, "sender.test.pyzone")
    write_zone(zone, public)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_path = os.path.join(RESULTS, "checks-%s.jsonl" % stamp)
    procs = Processes()
    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        needs_scanners = any(v in ("scan", "all") for v in variants) or CEILINGS
        clamd_conf = None
        if needs_scanners:
            log("starting spamd on %d and clamd on %d" % (SPAMD, CLAMD))
            start_spamd(procs)
            clamd_conf = start_clamd(procs)[1]
        if with_auth and any(v in ("auth", "all") for v in variants):
            log("starting the DNS server (twisted.names) on %d" % DNS)
            start_dns(procs, zone)
        for variant in variants:
            log("mta, %s: %d connections for %g s" % (variant, CONCURRENCY, DURATION))
            r = run_variant(procs, variant, message_path, with_auth)
            label = LABELS[variant]
            if variant == "all" and not with_auth:
                label = "all checks there are (spamd+clamd+attachments)"
            notes = []
            if variant in ("scan", "all") and not r["spamd_tagged"]:
                notes.append("NO X-Spam-Status in the delivered mail")
            if variant in ("auth", "all") and with_auth and not r["auth_results"]:
                notes.append("NO Authentication-Results in the delivered mail")
            rows.append(dict(r, row=variant, label="mta: " + label, note="; ".join(notes)))
        for ceiling in CEILINGS:
            target = {"spamd": "127.0.0.1:%d" % SPAMD, "spamc": "127.0.0.1:%d" % SPAMD,
                      "clamd": "127.0.0.1:%d" % CLAMD, "clamdscan": clamd_conf}[ceiling]
            log("ceiling: %s alone, %d at a time for %g s" % (ceiling, CONCURRENCY, DURATION))
            r = load(ceiling, target, message_path)
            how = "asyncio client" if ceiling in ("spamd", "clamd") else "binary per message"
            rows.append(dict(r, row="ceiling-" + ceiling, label="%s alone (%s)" % (ceiling, how)))
    finally:
        procs.stop_all()
        with open(out_path, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, stamp=stamp, duration=DURATION)) + "\n")
    print("checks benchmark, %d connections, %g s per row, message %d bytes (%s)"
          % (CONCURRENCY, DURATION, os.path.getsize(message_path), time.strftime("%Y-%m-%d %H:%M")))
    print(table(rows, with_auth))
    log("raw results: %s; logs under %s" % (out_path, DIR))


if __name__ == "__main__":
    main()
