"""End to end: a real `twistd mta` subprocess, real clients over loopback, real Maildirs."""

from __future__ import annotations

import email
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool

pytestmark = pytest.mark.e2e

DELIVERY_TIMEOUT = 60.0


def wait_for_files(directory: Path, count: int, timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
    """Poll (bounded) until `directory` holds at least `count` files."""
    deadline = time.monotonic() + timeout
    files: list[Path] = []
    while time.monotonic() < deadline:
        if directory.is_dir():
            files = sorted(p for p in directory.iterdir() if p.is_file())
            if len(files) >= count:
                return files
        time.sleep(0.05)
    raise AssertionError(f"{directory}: {len(files)} files after {timeout}s, wanted {count}")


def split_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """The prepended trace headers (Return-Path, Delivered-To, Received) and the rest."""
    trace = []
    rest = data
    for name in (b"Return-Path:", b"Delivered-To:", b"Received:"):
        assert rest.startswith(name), rest[:200]
        end = rest.index(b"\r\n", 0)
        while rest[end + 2 : end + 3] in (b" ", b"\t"):
            end = rest.index(b"\r\n", end + 2)
        trace.append(rest[: end + 2])
        rest = rest[end + 2 :]
    return trace, rest


MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: postmaster@localhost\r\n"
    b"Subject: e2e\r\n"
    b"Message-ID: <e2e-1@remote.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b".leading dot survives\r\n" + b"x" * 2000 + b"\r\n"
)


def test_smtplib_message_lands_byte_exact_in_postmaster_maildir(mta_server):
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("client.remote.test")
        assert client.has_extn("pipelining") and client.has_extn("chunking")
        refused = client.sendmail("sender@remote.test", ["postmaster@localhost"], MESSAGE)
        assert refused == {}
    [path] = wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)
    trace, rest = split_trace(path.read_bytes())
    assert rest == MESSAGE
    assert trace[0] == b"Return-Path: <sender@remote.test>\r\n"
    assert trace[1] == b"Delivered-To: postmaster@localhost\r\n"
    assert b"from client.remote.test ([127.0.0.1])" in trace[2]
    assert not list((mta_server.maildir("postmaster@localhost") / "tmp").iterdir())


def test_swaks_to_postmaster(mta_server):
    swaks = require_tool("swaks")
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{mta_server.smtp_port}", "--to", "postmaster@localhost",
         "--from", "someone@remote.test", "--helo", "swaks.remote.test", "--header", "Subject: swaks test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    [path] = wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)
    msg = email.message_from_bytes(path.read_bytes())
    assert msg["Subject"] == "swaks test"


def test_postmaster_of_every_local_domain_and_bare_postmaster(mta_server):
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("c.test")
        client.mail("")
        for rcpt in ("<postmaster>", "<POSTMASTER@example.test>", "<postmaster@localhost>"):
            code, _ = client.docmd("RCPT TO:" + rcpt)
            assert code == 250, rcpt
        code, _ = client.data(b"Subject: pm\r\n\r\nbody\r\n")
        assert code == 250
    # Three RCPTs, one mailbox: delivered once.
    wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)


def test_unknown_user_then_user_add(mta_server):
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("c.test")
        client.mail("s@remote.test")
        code, text = client.rcpt("alice@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
    added = mta_server.admin("user", "add", "alice@example.test", "--no-password")
    assert added.returncode == 0, added.stderr
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        assert (
            client.sendmail("s@remote.test", ["alice@example.test"], b"Subject: hi\r\n\r\nx\r\n")
            == {}
        )
    wait_for_files(mta_server.maildir("alice@example.test") / "new", 1)


def test_relay_is_denied_from_loopback_without_relay_networks(mta_server):
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("c.test")
        client.mail("s@example.test")
        code, text = client.rcpt("victim@elsewhere.test")
        assert (code, text[:5]) == (550, b"5.7.1")
        code, text = client.rcpt('"victim@elsewhere.test"@example.test')
        assert code == 550


def test_starttls_with_a_real_handshake(mta_server):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("tls.remote.test")
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo("tls.remote.test")
        assert not client.has_extn("starttls")
        code, _ = client.docmd("STARTTLS")
        assert code == 503
        assert (
            client.sendmail("s@remote.test", ["postmaster@localhost"], b"Subject: tls\r\n\r\nx\r\n")
            == {}
        )
    [path] = wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)
    data = path.read_bytes()
    assert b"with ESMTPS (TLSv1." in data


def test_tls_below_1_2_is_refused(mta_server):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot even offer TLS 1.1: {e}")
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
        client.ehlo("old.remote.test")
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            client.starttls(context=ctx)


def test_smtps_implicit_tls_and_submission_require_auth(mta_server):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL(
        mta_server.host, mta_server.smtps_port, timeout=30, context=ctx
    ) as client:
        client.ehlo("c.test")
        code, text = client.mail("s@remote.test")
        assert (code, text[:5]) == (530, b"5.7.0")
    with smtplib.SMTP(mta_server.host, mta_server.submission_port, timeout=30) as client:
        client.ehlo("c.test")
        code, text = client.mail("s@remote.test")
        assert (code, text[:5]) == (530, b"5.7.0")
        code, _ = client.docmd("AUTH", "PLAIN AHUAcA==")
        assert code == 538


def test_raw_pipelining_and_injection_after_starttls(mta_server):
    """One write with a whole transaction; then STARTTLS followed by plaintext."""
    with socket.create_connection((mta_server.host, mta_server.smtp_port), timeout=30) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(
            b"EHLO p.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<postmaster@localhost>\r\n"
            b"RCPT TO:<nobody@localhost>\r\nDATA\r\nSubject: pipe\r\n\r\nbody\r\n.\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@remote.test>\r\n"
        )
        lines = []
        while not lines or not lines[-1].startswith(b"220 2.0.0"):
            line = f.readline()
            assert line, lines
            lines.append(line)
        codes = [line[:4] for line in lines if line[3:4] == b" "]
        assert codes == [b"250 ", b"250 ", b"250 ", b"550 ", b"354 ", b"250 ", b"220 "]
        # The injected RSET/MAIL must never be answered in plaintext.
        s.settimeout(1.0)
        try:
            extra = s.recv(100)
        except TimeoutError:
            extra = b""
        assert extra == b""
    wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)


def test_big_message_keeps_server_memory_bounded(mta_server):
    """A 30 MB message streams through; the server's RSS does not grow by its size."""

    def rss_kb(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    before = rss_kb(mta_server.pid)
    line = b"0123456789" * 9 + b"abcdefgh\r\n"
    body = b"Subject: big\r\n\r\n" + line * (30 * 1024 * 1024 // len(line))
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=120) as client:
        assert client.sendmail("s@remote.test", ["postmaster@localhost"], body) == {}
    peak = rss_kb(mta_server.pid)
    [path] = wait_for_files(mta_server.maildir("postmaster@localhost") / "new", 1)
    assert path.stat().st_size > len(body)
    assert peak - before < 20 * 1024, f"RSS grew by {peak - before} KB for a 30 MB message"


def test_check_config_cli(mta_server, tmp_path):
    ok = mta_server.admin("check-config", str(mta_server.config_path))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_mesage_size = 10\n")
    out = mta_server.admin("check-config", str(bad))
    assert out.returncode == 1
    assert str(bad) in out.stderr and "limits.max_mesage_size" in out.stderr


def test_example_config_runs(mta_server_factory, tmp_path):
    """`twistd -n mta --config etc/mta.toml` starts (ports rewritten to free ones)."""
    import tomllib

    example = Path(__file__).resolve().parents[2] / "etc" / "mta.toml"
    data = tomllib.loads(example.read_text())
    server = mta_server_factory(start=False, name="example")
    data["datadir"] = str(server.datadir)
    data["listener"] = server.config["listener"]
    data["http"] = server.config["http"]
    data.pop("tls", None)
    server.config = data
    from tests.conftest import to_toml

    server.config_path.write_text(to_toml(data))
    server.start()
    assert os.path.isdir(server.datadir / "queue")


def test_sigterm_after_traffic_exits_cleanly(mta_server):
    """Shutdown stops services in order; it must not hang with work in flight."""
    for i in range(20):
        with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as client:
            client.sendmail(
                "s@remote.test", ["postmaster@localhost"], f"Subject: {i}\r\n\r\nx\r\n".encode()
            )
    code = mta_server.stop(timeout=20)
    # Newer twistd re-raises the signal at exit (status -15); older ones exit 0.
    assert code in (0, -signal.SIGTERM), mta_server.log()[-3000:]
    assert "mta stopped" in mta_server.log()


def test_sighup_reloads_the_certificate_without_dropping_connections(mta_server):
    from mta.smtp.tls import generate_self_signed

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def served_cn(client) -> str:
        from cryptography import x509

        der = client.sock.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    old = smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30)
    old.ehlo("c.test")
    old.starttls(context=ctx)
    assert served_cn(old) == "CN=mx.example.test"
    tls_dir = mta_server.datadir / "tls"
    generate_self_signed(
        str(tls_dir / "selfsigned.crt"), str(tls_dir / "selfsigned.key"), "renewed.example.test"
    )
    os.kill(mta_server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "TLS certificate reloaded" not in mta_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    with smtplib.SMTP(mta_server.host, mta_server.smtp_port, timeout=30) as new:
        new.ehlo("c.test")
        new.starttls(context=ctx)
        assert served_cn(new) == "CN=renewed.example.test"
    # The connection made before the reload is still served.
    old.ehlo("c.test")
    assert (
        old.sendmail(
            "s@remote.test", ["postmaster@localhost"], b"Subject: after reload\r\n\r\nx\r\n"
        )
        == {}
    )
    old.quit()
    assert mta_server.running


def test_utf8_mailboxes_over_smtputf8_and_refused_without_it(mta_server):
    """RFC 6531: josé@ and 用户@ are real mailboxes; NFD spelling reaches the NFC one;
    without the SMTPUTF8 parameter such a recipient is refused with 553 5.6.7."""
    for user in ("josé@example.test", "用户@example.test"):
        added = mta_server.admin("user", "add", user, "--no-password")
        assert added.returncode == 0, added.stderr
    with socket.create_connection((mta_server.host, mta_server.smtp_port), timeout=30) as s:
        f = s.makefile("rwb")

        def say(line: str) -> bytes:
            f.write(line.encode("utf-8") + b"\r\n")
            f.flush()
            reply = b""
            while True:
                got = f.readline()
                reply += got
                if got[3:4] != b"-":
                    return reply

        assert f.readline().startswith(b"220")
        assert say("EHLO client.test").startswith(b"250")
        assert say("MAIL FROM:<s@remote.test>").startswith(b"250")
        assert say("RCPT TO:<josé@example.test>").startswith(b"553 5.6.7")
        assert say("RSET").startswith(b"250")
        assert say("MAIL FROM:<s@remote.test> SMTPUTF8").startswith(b"250")
        assert say("RCPT TO:<josé@example.test>").startswith(b"250")
        assert say("RCPT TO:<jose\u0301@example.test>").startswith(b"250")  # NFD
        assert say("RCPT TO:<用户@example.test>").startswith(b"250")
        assert say("DATA").startswith(b"354")
        body = "From: s@remote.test\r\nSubject: héllo\r\n\r\nünïcode\r\n.\r\n"
        f.write(body.encode("utf-8"))
        f.flush()
        assert f.readline().startswith(b"250")
        say("QUIT")
    mail = mta_server.datadir / "mail" / "example.test"
    [jose] = wait_for_files(mail / "josé" / "new", 1)
    [yonghu] = wait_for_files(mail / "用户" / "new", 1)
    assert "héllo".encode() in jose.read_bytes() and "ünïcode".encode() in yonghu.read_bytes()
