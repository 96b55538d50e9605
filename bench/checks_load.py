#!/usr/bin/env python3
"""Closed-loop load clients for the checks benchmark (bench/checks_bench.py), all
sending ONE given message file, C at a time, and printing one JSON line
(msgs_per_s, p50/p99 latency, errors):

  smtp ADDR      L1-like: C persistent connections, EHLO once, then MAIL FROM / RCPT TO /
                 DATA / message / "." one command at a time (latency: MAIL FROM -> 250
                 after the dot), as bench/smtp_latency.py does, but with the message
                 from --message (DKIM-signed, MIME) instead of a generated body
  spamd ADDR     SPAMC/1.5 SYMBOLS, one connection per message (as spamd wants)
  clamd ADDR     clamd zINSTREAM (the message as one chunk), one connection per message
  spamc ADDR     the `spamc -y` binary, one process per message
  clamdscan CONF the `clamdscan --stream -` binary with clamd.conf CONF, one process per message

Latency of a scanner request = connect (or process start) -> the whole answer.  Runs
until --messages are done or --time-limit seconds passed.  Standard library only.
"""

import argparse
import asyncio
import json
import os
import shutil
import struct
import sys
import time


def pct(values, p):
    if not values:
        return None
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * len(values) + 0.5)) - 1))
    return values[k]


class Run:
    """Hands out message numbers until the count or the time limit is reached."""

    def __init__(self, a):
        self.a = a
        self.next = 0
        self.lat = []
        self.errors = 0
        self.samples = []
        self.deadline = None

    def take(self):
        if self.next >= self.a.messages or time.monotonic() > self.deadline:
            return None
        self.next += 1
        return self.next - 1

    def error(self, what):
        self.errors += 1
        if len(self.samples) < 5:
            self.samples.append(str(what)[:200])


async def read_reply(reader):
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return int(lines[-1][:3]), lines


def hostport(addr):
    host, _, port = addr.rpartition(":")
    return host or "127.0.0.1", int(port)


async def smtp_worker(run, a, message, ready, go):
    host, port = hostport(a.target)
    data = message.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    data += b".\r\n"
    mail = b"MAIL FROM:<%s>\r\n" % a.mail_from.encode()
    rcpt = b"RCPT TO:<%s>\r\n" % a.rcpt_to.encode()
    reader = writer = None

    async def connect():
        r, w = await asyncio.open_connection(host, port)
        code, _ = await read_reply(r)
        if code != 220:
            raise ConnectionError("greeting %d" % code)
        w.write(b"EHLO %s\r\n" % a.ehlo.encode())
        code, _ = await read_reply(r)
        if code != 250:
            raise ConnectionError("EHLO %d" % code)
        return r, w

    try:
        reader, writer = await connect()
    except (OSError, ConnectionError) as e:
        run.error(e)
    ready()
    await go.wait()
    while run.take() is not None:
        try:
            if writer is None:
                reader, writer = await connect()
            t0 = time.perf_counter()
            for command, want in ((mail, (250,)), (rcpt, (250, 251)), (b"DATA\r\n", (354,))):
                writer.write(command)
                code, lines = await read_reply(reader)
                if code not in want:
                    raise ConnectionError("%s -> %r" % (command.split()[0].decode(), lines[-1][:80]))
            writer.write(data)
            code, lines = await read_reply(reader)
            if code != 250:
                raise ConnectionError("end of data -> %r" % lines[-1][:100])
            run.lat.append(time.perf_counter() - t0)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            run.error(e)
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(read_reply(reader), 5)
        except Exception:
            pass
        writer.close()


async def _exchange(addr, request):
    """Connect, send, read until the daemon closes (clamd: until its NUL)."""
    reader, writer = await asyncio.open_connection(*hostport(addr))
    try:
        writer.write(request)
        chunks = []
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if chunks[-1].endswith(b"\0"):
                break
        return b"".join(chunks)
    finally:
        writer.close()


async def spamd_once(a, message):
    request = b"SYMBOLS SPAMC/1.5\r\nContent-length: %d\r\nUser: mta\r\n\r\n" % len(message)
    answer = await _exchange(a.target, request + message)
    if b" 0 EX_OK" not in answer.split(b"\r\n", 1)[0]:
        raise ConnectionError("spamd: %r" % answer[:100])


async def clamd_once(a, message):
    request = b"zINSTREAM\0" + struct.pack("!L", len(message)) + message + struct.pack("!L", 0)
    answer = await _exchange(a.target, request)
    if not answer.rstrip(b"\0").endswith(b"OK"):
        raise ConnectionError("clamd: %r" % answer[:100])


async def process_once(argv, message_path):
    with open(message_path, "rb") as stdin:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await proc.communicate()
    if proc.returncode != 0:
        raise ConnectionError("%s exited %d: %r" % (os.path.basename(argv[0]), proc.returncode, err[:100]))


async def request_worker(run, once, ready, go):
    ready()
    await go.wait()
    while run.take() is not None:
        t0 = time.perf_counter()
        try:
            await once()
            run.lat.append(time.perf_counter() - t0)
        except (OSError, ConnectionError, asyncio.IncompleteReadError) as e:
            run.error(e)
            await asyncio.sleep(0.05)


def one_request(a, message):
    if a.kind == "spamd":
        return lambda: spamd_once(a, message)
    if a.kind == "clamd":
        return lambda: clamd_once(a, message)
    if a.kind == "spamc":
        host, port = hostport(a.target)
        argv = [shutil.which("spamc") or "spamc", "-d", host, "-p", str(port), "-y", "-x"]
    else:  # clamdscan
        argv = [shutil.which("clamdscan") or "clamdscan", "--config-file=" + a.target, "--stream",
                "--no-summary", "-"]
    return lambda: process_once(argv, a.message)


async def amain(a):
    with open(a.message, "rb") as f:
        message = f.read()
    run = Run(a)
    run.deadline = time.monotonic() + a.time_limit + 60
    go = asyncio.Event()
    ready_count = [0]
    all_ready = asyncio.Event()

    def ready():
        ready_count[0] += 1
        if ready_count[0] == a.concurrency:
            all_ready.set()

    if a.kind == "smtp":
        workers = [smtp_worker(run, a, message, ready, go) for _ in range(a.concurrency)]
    else:
        once = one_request(a, message)
        workers = [request_worker(run, once, ready, go) for _ in range(a.concurrency)]
    tasks = [asyncio.ensure_future(w) for w in workers]
    await asyncio.wait_for(all_ready.wait(), 60)
    run.deadline = time.monotonic() + a.time_limit
    t0 = time.perf_counter()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), a.time_limit + 120)
    wall = time.perf_counter() - t0
    lat = sorted(run.lat)
    out = {
        "tool": "checks_load", "kind": a.kind, "target": a.target, "concurrency": a.concurrency,
        "message_bytes": len(message), "ok": len(lat), "errors": run.errors,
        "error_samples": run.samples, "wall_s": round(wall, 3),
        "msgs_per_s": round(len(lat) / wall, 1) if wall > 0 else None,
        "loadavg": os.getloadavg()[0],
    }
    for p in (50, 99):
        v = pct(lat, p)
        out["p%d_ms" % p] = round(v * 1000, 2) if v is not None else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("smtp", "spamd", "clamd", "spamc", "clamdscan"))
    ap.add_argument("target", help="host:port (clamdscan: its clamd.conf)")
    ap.add_argument("--message", required=True, help="the message file (CRLF lines)")
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("-m", "--messages", type=int, default=1000000)
    ap.add_argument("--time-limit", type=float, default=20.0, help="stop starting messages after this")
    ap.add_argument("--from", dest="mail_from", default="alice@sender.test")
    ap.add_argument("--to", dest="rcpt_to", default="to@bench.test")
    ap.add_argument("--ehlo", default="client.bench.test")
    a = ap.parse_args()
    out = asyncio.run(amain(a))
    print(json.dumps(out))
    sys.exit(0 if out["ok"] > 0 else 1)


if __name__ == "__main__":
    main()
