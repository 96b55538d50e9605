#!/usr/bin/env python3
"""The client side of the AUTH + TLS submission benchmark (issue #3).

Two modes, both talking to a STARTTLS submission port on 127.0.0.1:

  load  -c 20 sessions at once; each connects, EHLO, STARTTLS, EHLO, AUTH PLAIN once,
        then sends -m messages of -l bytes one at a time (MAIL, RCPT, DATA, the
        message, the dot; no pipelining), then QUIT.  Prints one JSON line: msgs/s,
        p50/p95/p99 of MAIL FROM -> 250 after the dot, errors, client CPU.
  idle  opens -n connections, each EHLO + STARTTLS (full handshake) + EHLO, then holds
        them; prints {"ok": .., "failed": ..} and "READY", and closes them all at
        stdin EOF (or after --hold seconds).  Like smtp_idle.py, but over TLS.

Only the standard library (Python 3.11+: asyncio's StreamWriter.start_tls).  The
certificate is not verified: the targets use self-signed ones.
"""
import argparse
import asyncio
import base64
import json
import os
import resource
import ssl
import sys
import threading
import time


class SMTPError(Exception):
    pass


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def reply(reader, timeout):
    """Read one (possibly multi-line) reply; return (code, [lines])."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise SMTPError("connection closed")
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def cmd(reader, writer, line, timeout, expect):
    writer.write(line + b"\r\n")
    code, lines = await reply(reader, timeout)
    if code != expect:
        # never echo an AUTH line back: it carries the password
        shown = line.split(b" ", 1)[0] if line.upper().startswith(b"AUTH") else line[:40]
        raise SMTPError("%s -> %s" % (shown.decode(errors="replace"), lines[-1][:80].decode(errors="replace")))
    return lines


async def open_tls(host, port, ctx, timeout, helo):
    """Connect, read 220, EHLO, STARTTLS, handshake, EHLO again; return (reader, writer, ehlo lines)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        code, lines = await reply(reader, timeout)
        if code != 220:
            raise SMTPError("greeting %r" % lines[-1][:60])
        ehlo = await cmd(reader, writer, b"EHLO " + helo, timeout, 250)
        if not any(x[4:].upper().startswith(b"STARTTLS") for x in ehlo):
            raise SMTPError("STARTTLS not offered")
        await cmd(reader, writer, b"STARTTLS", timeout, 220)
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname="localhost"), timeout)
        ehlo = await cmd(reader, writer, b"EHLO " + helo, timeout, 250)
    except BaseException:
        writer.close()
        raise
    return reader, writer, ehlo


def make_body(size, sender, rcpt, n):
    head = ("From: <%s>\r\nTo: <%s>\r\nSubject: bench %d\r\nMessage-ID: <bench.%d.%f@client.bench.test>\r\n"
            "Date: %s\r\n\r\n" % (sender, rcpt, n, n, time.time(),
                                  time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()))).encode()
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) < size:
        body += line
    return bytes(body[:size - 2]).rstrip(b"\r\n") + b"\r\n.\r\n"


async def session(a, host, port, ctx, lat, errors, counter, no_auth, setup):
    t0 = time.perf_counter()
    try:
        reader, writer, ehlo = await open_tls(host, port, ctx, a.timeout, a.helo.encode())
    except Exception as e:  # noqa: BLE001 - counted
        errors.append("connect: %s: %s" % (type(e).__name__, e))
        return
    try:
        if not no_auth:
            if not any(x[4:].upper().startswith(b"AUTH") and b"PLAIN" in x.upper() for x in ehlo):
                raise SMTPError("AUTH PLAIN not offered after STARTTLS")
            token = base64.b64encode(b"\0" + a.user.encode() + b"\0" + a.password.encode())
            await cmd(reader, writer, b"AUTH PLAIN " + token, a.timeout, 235)
        setup.append(time.perf_counter() - t0)
        for _ in range(a.m):
            n = counter[0]
            counter[0] += 1
            data = make_body(a.l, a.sender, a.rcpt, n)
            t0 = time.perf_counter()
            try:
                await cmd(reader, writer, b"MAIL FROM:<%s>" % a.sender.encode(), a.timeout, 250)
                await cmd(reader, writer, b"RCPT TO:<%s>" % a.rcpt.encode(), a.timeout, 250)
                await cmd(reader, writer, b"DATA", a.timeout, 354)
                writer.write(data)
                code, lines = await reply(reader, a.timeout)
                if code != 250:
                    raise SMTPError("after dot: %s" % lines[-1][:80].decode(errors="replace"))
            except SMTPError as e:
                errors.append(str(e))
                await cmd(reader, writer, b"RSET", a.timeout, 250)
                continue
            lat.append(time.perf_counter() - t0)
        writer.write(b"QUIT\r\n")
        await writer.drain()
    except Exception as e:  # noqa: BLE001 - counted
        errors.append("%s: %s" % (type(e).__name__, e))
    finally:
        writer.close()


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


async def load(a):
    host, _, port = a.addr.rpartition(":")
    ctx = tls_context()
    lat, errors, counter, setup = [], [], [0], []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await asyncio.gather(*(session(a, host, int(port), ctx, lat, errors, counter, a.no_auth, setup) for _ in range(a.c)))
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    lat.sort()
    setup.sort()
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    out = {
        "mode": "load", "sessions": a.c, "per_session": a.m, "size": a.l, "auth": not a.no_auth,
        "sent": len(lat), "errors": len(errors), "error_samples": errors[:3],
        "wall_s": round(wall, 3), "msgs_per_s": round(len(lat) / wall, 1) if wall else None,
        "p50_ms": ms(pct(lat, 50)), "p95_ms": ms(pct(lat, 95)), "p99_ms": ms(pct(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        # connect + EHLO + STARTTLS + EHLO + AUTH, per session
        "setup_p50_ms": ms(pct(setup, 50)), "setup_max_ms": ms(setup[-1] if setup else None),
        "client_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2),
    }
    print(json.dumps(out), flush=True)


async def wait_stdin_eof():
    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def read():
        try:
            sys.stdin.read()
        finally:
            loop.call_soon_threadsafe(done.set)

    threading.Thread(target=read, daemon=True).start()
    await done.wait()


async def idle(a):
    host, _, port = a.addr.rpartition(":")
    ctx = tls_context()
    sem = asyncio.Semaphore(a.parallel)
    conns, errors = [], []

    async def one():
        async with sem:
            try:
                r, w, _ = await open_tls(host, int(port), ctx, a.timeout, a.helo.encode())
                conns.append((r, w))
            except Exception as e:  # noqa: BLE001 - counted
                errors.append("%s: %s" % (type(e).__name__, e))

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(a.n)))
    print(json.dumps({"mode": "idle", "ok": len(conns), "failed": len(errors),
                      "connect_s": round(time.perf_counter() - t0, 3), "errors": errors[:3]}), flush=True)
    print("READY", flush=True)
    try:
        await asyncio.wait_for(wait_stdin_eof(), a.hold)
    except asyncio.TimeoutError:
        pass
    for _, w in conns:
        try:
            w.close()
        except Exception:  # noqa: BLE001
            pass
    await asyncio.sleep(0.1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["load", "idle"])
    ap.add_argument("addr", help="127.0.0.1:PORT")
    ap.add_argument("-c", type=int, default=20, help="concurrent sessions (load)")
    ap.add_argument("-m", type=int, default=50, help="messages per session (load)")
    ap.add_argument("-l", type=int, default=4096, help="message size in bytes (load)")
    ap.add_argument("-n", type=int, default=500, help="connections to hold (idle)")
    ap.add_argument("--user", default="")
    ap.add_argument("--password-env", default="BENCH_PASSWORD",
                    help="environment variable holding the password (not on the command line)")
    ap.add_argument("--no-auth", action="store_true", help="TLS only, no AUTH (a target without SASL)")
    ap.add_argument("--sender", default="")
    ap.add_argument("--rcpt", default="")
    ap.add_argument("--helo", default="client.bench.test")
    ap.add_argument("--parallel", type=int, default=50, help="handshakes in flight at once (idle)")
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--hold", type=float, default=120)
    a = ap.parse_args()
    a.password = os.environ.get(a.password_env, "")
    a.sender = a.sender or a.user
    a.rcpt = a.rcpt or a.user
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(a.n, a.c) + 100
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, want), hard))
    if sys.version_info < (3, 11):
        sys.exit("submission_tls.py needs Python 3.11+ (StreamWriter.start_tls)")
    asyncio.run(load(a) if a.mode == "load" else idle(a))


if __name__ == "__main__":
    main()
