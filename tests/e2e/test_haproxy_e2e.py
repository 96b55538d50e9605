"""End to end: a real HAProxy (Debian's `haproxy`) running the shipped
etc/haproxy/haproxy.cfg (addresses rewritten for loopback) in front of two
`twistd mta` nodes with `proxy_protocol = true` and the file spool.

The client connects from 127.0.0.5, HAProxy from 127.0.0.1 (the only address in the
nodes' `proxy_networks`): the nodes must see 127.0.0.5 in the Received header and the
logs, and HAProxy must route by each node's /readyz."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import READY_TIMEOUT, REPO_ROOT, MtaServer, free_ports, require_tool, to_toml

pytestmark = pytest.mark.e2e

SHIPPED = REPO_ROOT / "etc" / "haproxy" / "haproxy.cfg"
CLIENT_IP = "127.0.0.5"  # a loopback address that is not HAProxy's
PASSWORD = "proxy-e2e-secret"
WAIT = 60.0  # bound of every poll below (never a timing assertion)


class ProxiedNode(MtaServer):
    """An mta node whose SMTP listeners expect a PROXY header from 127.0.0.1: it is
    ready when /readyz says so (a direct SMTP probe would get no greeting)."""

    def __init__(self, root: Path):
        super().__init__(root)
        for listener in self.config["listener"]:
            listener["proxy_protocol"] = True
        self.config["limits"] = {"proxy_networks": ["127.0.0.1/32"], "proxy_timeout": 5.0}
        self.config_path.write_text(to_toml(self.config))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"twistd mta exited before it was ready:\n{self.log()}")
            if self.readyz() == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"mta not ready after {timeout}s:\n{self.log()}")

    def readyz(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}/readyz", timeout=5):
                return 200
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def records(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out


def loopback_config(nodes: list[ProxiedNode], binds: dict[int, int], sock: Path) -> str:
    """The shipped configuration for this machine: our own global section (no
    chroot, user or daemon; a stats socket in tmp), the frontends bound to free
    loopback ports, servers mta1/mta2 pointing at the nodes (mta3 dropped), checks
    every 200 ms instead of 2 s."""
    text = SHIPPED.read_text()
    body = text[text.index("\ndefaults") :]
    for port, local in binds.items():
        body, n = re.subn(rf"\n(\s+)bind :{port}\n", rf"\n\1bind 127.0.0.1:{local}\n", body)
        assert n == 1, f"no 'bind :{port}' in {SHIPPED}"

    def server(m: re.Match) -> str:
        index = int(m.group(2)) - 1
        if index >= len(nodes):
            return ""
        node = nodes[index]
        local = {25: node.smtp_port, 587: node.submission_port, 465: node.smtps_port}
        return f"{m.group(1)}server mta{index + 1} {node.host}:{local[int(m.group(3))]} port {node.http_port}\n"

    body, n = re.subn(r"(\s+)server mta(\d) \S+:(\d+)\n", server, body)
    assert n == 9, f"expected 3 servers in 3 backends in {SHIPPED}"
    body, n = re.subn(r"\binter 2s\b", "inter 200ms", body)
    assert n == 1
    return f"global\n    stats socket {sock} mode 600 level admin\n    maxconn 1000\n{body}"


def haproxy_stats(sock: Path) -> dict[tuple[str, str], dict[str, str]]:
    """`show stat` over the admin socket: (backend, server) -> the CSV row."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().lstrip("# ").splitlines()
    return {(r["pxname"], r["svname"]): r for r in csv.DictReader(lines)}


def wait_for(predicate, what: str, explain=lambda: ""):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not {what} after {WAIT}s\n{explain()}")


@pytest.fixture
def cluster(tmp_path, request):
    haproxy = require_tool("haproxy")
    nodes = [ProxiedNode(tmp_path / f"node{i}") for i in (1, 2)]
    sock = tmp_path / "haproxy.sock"
    binds = dict(zip((25, 587, 465), free_ports(3), strict=True))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(loopback_config(nodes, binds, sock))
    checked = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log = open(tmp_path / "haproxy.log", "wb")
    proc = None
    try:
        for node in nodes:
            node.start()
            added = node.admin(
                "user", "add", "--password-stdin", "alice@example.test", input=PASSWORD + "\n"
            )
            assert added.returncode == 0, added.stderr
        proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(lambda: sock.exists(), "listening", lambda: (tmp_path / "haproxy.log").read_text())
        yield nodes, binds, sock
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        log.close()
        failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
        for node in nodes:
            node.stop()
            if failed:
                print(f"----- {node.root.name} log -----\n{node.log()}")
        if failed:
            print(f"----- haproxy log -----\n{(tmp_path / 'haproxy.log').read_text()}")


def server_states(sock: Path) -> dict[tuple[str, str], tuple[str, str, str]]:
    stats = haproxy_stats(sock)
    return {
        key: (row["status"], row["check_status"], row["check_code"])
        for key, row in stats.items()
        if key[1].startswith("mta")
    }


def all_up(sock: Path) -> bool:
    states = server_states(sock)
    return len(states) == 6 and all(s[0] == "UP" for s in states.values())


def send(binds: dict[int, int], port: int, subject: str) -> None:
    """One message through HAProxy from CLIENT_IP: 25 plain to postmaster, 465 with
    implicit TLS and AUTH, 587 with STARTTLS and AUTH."""
    message = f"From: alice@example.test\r\nSubject: {subject}\r\n\r\nvia haproxy\r\n"
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    source = (CLIENT_IP, 0)
    if port == 465:
        client = smtplib.SMTP_SSL(
            "127.0.0.1", binds[465], timeout=30, context=tls, source_address=source
        )
    else:
        client = smtplib.SMTP("127.0.0.1", binds[port], timeout=30, source_address=source)
    with client:
        if port == 587:
            client.starttls(context=tls)
        if port != 25:
            client.login("alice@example.test", PASSWORD)
        client.sendmail("alice@example.test", ["postmaster@localhost"], message)


def delivered(node: ProxiedNode) -> list[bytes]:
    new = node.maildir("postmaster@localhost") / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def received_from(data: bytes) -> str:
    m = re.search(rb"^Received: from \S+ \(\[([^\]]+)\]\)", data, re.M)
    assert m, data[:400]
    return m.group(1).decode()


def test_haproxy_passes_the_client_address_and_routes_by_readyz(cluster):
    nodes, binds, sock = cluster
    wait_for(lambda: all_up(sock), "all servers UP", lambda: str(server_states(sock)))
    # Every server was checked over HTTP: layer 7 OK, status 200 from /readyz.  (Waited
    # for: while a check is running HAProxy shows "* L7OK" with no code yet.)
    wait_for(
        lambda: all(v == ("UP", "L7OK", "200") for v in server_states(sock).values()),
        "every server's last check L7OK 200",
        lambda: str(server_states(sock)),
    )

    for i, port in enumerate((25, 465, 587, 25, 25, 25)):
        send(binds, port, f"m{i}")
    wait_for(lambda: sum(len(delivered(n)) for n in nodes) == 6, "6 delivered")
    counts = [len(delivered(n)) for n in nodes]
    assert all(counts), counts  # leastconn spread the sessions over both nodes
    for node in nodes:
        for data in delivered(node):
            assert received_from(data) == CLIENT_IP
        connects = [r for r in node.records() if r.get("event") == "connect"]
        assert connects and {r["client"] for r in connects} == {CLIENT_IP}
        headers = [r for r in node.records() if r.get("event") == "proxy_header"]
        assert {(r["client"], r["proxy"]) for r in headers} == {(CLIENT_IP, "127.0.0.1")}

    # A client reaching a node directly (not from proxy_networks) gets nothing.
    with socket.create_connection(
        (nodes[0].host, nodes[0].smtp_port), timeout=30, source_address=(CLIENT_IP, 0)
    ) as direct:
        direct.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 1 25\r\nEHLO forged\r\n")
        assert direct.recv(1024) == b""
    wait_for(
        lambda: any(r.get("event") == "proxy_refused" for r in nodes[0].records()),
        "proxy_refused logged",
    )

    # Node 2 stops being ready (its mail store cannot take a file: /readyz 503): HAProxy
    # takes it out, and every new session goes to node 1.
    before = [len(delivered(n)) for n in nodes]
    mail = nodes[1].datadir / "mail"
    mail.rename(nodes[1].datadir / "mail.away")
    mail.write_text("not a directory\n")
    assert nodes[1].readyz() == 503
    wait_for(
        lambda: (
            {s for (_, n), s in server_states(sock).items() if n == "mta2"}
            == {("DOWN", "L7STS", "503")}
        ),
        "mta2 DOWN on /readyz 503",
        lambda: str(server_states(sock)),
    )
    for i in range(4):
        send(binds, 25, f"after-{i}")
    wait_for(lambda: len(delivered(nodes[0])) == before[0] + 4, "4 more on node 1")
    mail.unlink()
    shutil.move(nodes[1].datadir / "mail.away", mail)
    assert len(delivered(nodes[1])) == before[1]
    wait_for(lambda: all_up(sock), "mta2 UP again", lambda: str(server_states(sock)))
