"""`[queue] encrypt = true` through `twistd mta`: what waits in the queue, small or
spilled, is sealed on the disk; the operator still lists and shows it; local
delivery and a restart (recovery reads the sealed files back) work; retiring the
key it is sealed under is refused while it is queued.  On the PostgreSQL queue, a
message spilled while it arrives is never in clear on the disk either."""

from __future__ import annotations

import os
import smtplib
import socket
import struct
import time

from tests.conftest import free_port

TIMEOUT = 30.0
MARK = b"SEALED-IN-QUEUE-4b1d"


def message(size: int) -> bytes:
    head = b"Subject: " + MARK + b"\r\n\r\n"
    line = MARK + b" " + b"y" * 70 + b"\r\n"
    return head + line * (size // len(line) + 1)


def disk_has(root, needle: bytes) -> list[str]:
    found = []
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            try:
                with open(path, "rb") as f:
                    if needle in f.read():
                        found.append(path)
            except OSError:
                continue
    return found


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def deferred_ids(server) -> list[str]:
    out = server.admin("queue", "list", check=True).stdout
    return [p[0] for p in (line.split() for line in out.splitlines()) if p[1:2] == ["deferred"]]


def test_queued_mail_is_sealed_on_disk(mta_server_factory):
    closed = free_port()  # the smarthost refuses connections: remote mail stays queued
    server = mta_server_factory(
        {
            "relay_networks": ["127.0.0.0/8"],
            "relay": {"smarthost": f"127.0.0.1:{closed}"},
            "queue": {"encrypt": True, "retry_schedule": [3600.0]},
            "storage": {"master_key_file": "keys/master.key"},
        },
        start=False,
    )
    server.admin("key", "init", check=True)
    server.start()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("alice@example.test", ["bob@remote.test"], message(2_000))
        smtp.sendmail("alice@example.test", ["bob@remote.test"], message(900_000))  # spills
        smtp.sendmail("alice@example.test", ["postmaster@localhost"], message(3_000))
    ids = wait_for(lambda: (lambda i: i if len(i) == 2 else None)(deferred_ids(server)), "queue")
    new = server.maildir("postmaster@localhost") / "new"
    (local,) = wait_for(lambda: sorted(new.iterdir()) if new.is_dir() else [], "local mail")
    assert MARK in local.read_bytes()  # delivered in clear into the (clear) mailbox

    queue = server.datadir / "queue"
    assert disk_has(queue, MARK) == []
    assert disk_has(queue, b"Received: from") == []  # trace headers sealed too
    shown = server.admin("queue", "show", ids[0], check=True).stdout
    assert "Subject: " + MARK.decode() in shown and "Received: from" in shown

    key_id = server.admin("key", "list", check=True).stdout.split()[0]
    server.admin("key", "rotate", check=True)
    refused = server.admin("key", "retire", key_id)
    assert refused.returncode != 0
    assert "2 queued message(s)" in refused.stderr and "key kept" in refused.stderr

    # A restart reads the sealed entries back (recovery) and still holds them.
    server.stop()
    server.start()
    assert sorted(wait_for(lambda: deferred_ids(server), "recovered queue")) == sorted(ids)
    shown = server.admin("queue", "show", ids[1], check=True).stdout
    assert "Subject: " + MARK.decode() in shown
    assert disk_has(queue, MARK) == []


def test_queue_encrypt_without_a_key_is_refused_at_start(mta_server_factory):
    server = mta_server_factory(
        {"queue": {"encrypt": True}, "storage": {"master_key_file": "keys/absent.key"}},
        start=False,
    )
    result = server.admin("check-config")
    assert result.returncode == 0, result.stderr  # the config itself is fine
    checked = mta_server_factory({"queue": {"encrypt": True}}, start=False, name="nokey")
    bad = checked.admin("check-config")
    assert bad.returncode != 0 and "queue.encrypt" in (bad.stdout + bad.stderr)


class RawSession:
    """An SMTP client that can stop in the middle of DATA (smtplib cannot)."""

    def __init__(self, server):
        self.sock = socket.create_connection((server.host, server.smtp_port), timeout=10)
        self.buf = b""
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1 :])
                    return line
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.buf += data

    def command(self, line: bytes, expect: bytes) -> None:
        self.sock.sendall(line + b"\r\n")
        got = self.reply()
        assert got.startswith(expect), (line, got)

    def start_data(self, rcpt: bytes) -> None:
        self.command(b"EHLO client.test", b"250")
        self.command(b"MAIL FROM:<alice@remote.test>", b"250")
        self.command(b"RCPT TO:<" + rcpt + b">", b"250")
        self.command(b"DATA", b"354")

    def drop(self) -> None:
        """Cut the connection off (an RST, as when the client's host goes away)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def test_a_spilled_message_is_never_in_clear_on_the_postgresql_queue(mta_server_factory):
    """The PostgreSQL queue's spill file (``queue/pg-spill/<qid>``) is sealed while
    the message arrives; the local mail store is encrypted too, so no file under the
    data directory may hold the marker at any point.  A transfer cut off mid-DATA
    leaves no spill file."""
    from mta.crypto.keys import FileKeyring
    from mta.envelope import Address
    from mta.storage import crypto
    from tests.queue.pgtesting import private_database

    with private_database("test_pgq_e2e") as dsn:
        server = mta_server_factory(
            {
                "queue": {"backend": "postgresql", "encrypt": True},
                "database": {"dsn": dsn},
                "storage": {"master_key_file": "keys/master.key", "encrypt": True},
            },
            start=False,
        )
        server.admin("key", "init", check=True)
        server.start()
        spill = server.datadir / "queue" / "pg-spill"
        spilled = lambda: sorted(spill.iterdir()) if spill.is_dir() else []  # noqa: E731
        big = message(1_000_000)
        half = 600_000

        smtp = RawSession(server)
        smtp.start_data(b"postmaster@localhost")
        smtp.sock.sendall(big[:half])
        wait_for(spilled, "the spill file")
        assert disk_has(server.datadir, MARK) == []  # after the spill, before the end
        smtp.sock.sendall(big[half:] + b".\r\n")
        assert smtp.reply().startswith(b"250")
        assert disk_has(server.datadir, MARK) == []
        new = server.maildir("postmaster@localhost") / "new"
        (stored,) = wait_for(lambda: sorted(new.iterdir()) if new.is_dir() else [], "delivery")
        assert disk_has(server.datadir, MARK) == [] and spilled() == []
        ring = FileKeyring(str(next(server.root.rglob("master.key"))))
        _, delivered = crypto.decrypt(ring, Address("postmaster", "localhost"), stored.read_bytes())
        assert delivered.replace(b"\r\n", b"\n").endswith(big.replace(b"\r\n", b"\n"))
        smtp.command(b"QUIT", b"221")

        cut = RawSession(server)
        cut.start_data(b"postmaster@localhost")
        cut.sock.sendall(big[:half])
        wait_for(spilled, "the second spill file")
        cut.drop()
        wait_for(lambda: spilled() == [] or None, "the spill file to go")
        assert "queue is empty" in server.admin("queue", "list", check=True).stdout
