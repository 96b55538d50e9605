"""Real scanning daemons for the spamd and clamd tests, one of each per test session.

- `spamd_server`: SpamAssassin's spamd with `--local` (no network tests) on a free
  loopback port, its rules as Debian ships them (GTUBE scores 1000), TELL allowed and
  its Bayes database in its own directory (`Daemon.bayes`, `bayes_counts`).
- `clamd_server`: clamd with its own config and a tiny signature database this
  fixture writes (the EICAR test file as an MD5 signature, and a marker string as a
  body signature); no freshclam, no official databases.

Each is started as our own child, waited for until it answers PING, and stopped by
its own PID.  `require_tool` skips without the binary (fails under CI=true).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import pytest

from tests.conftest import free_port, require_tool

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
MARKER = b"MTA-TEST-VIRUS-MARKER-7f3c"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
READY_TIMEOUT = 90.0


@attrs.frozen
class Daemon:
    address: str  # host:port
    port: int
    process: subprocess.Popen
    log: Path
    bayes: Path | None = None  # spamd: the directory of its Bayes database


def _ping(port: int, request: bytes, answer: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(request)
            return answer in s.recv(100)
    except OSError:
        return False


def _wait(process: subprocess.Popen, port: int, request: bytes, answer: bytes, log: Path):
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _ping(port, request, answer):
            return
        time.sleep(0.1)
    _stop(process)
    text = log.read_text(errors="replace") if log.exists() else ""
    pytest.fail(f"{process.args[0]} did not answer on port {port}:\n{text[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def spamd_server(tmp_path_factory):
    spamd = require_tool("spamd")
    home = tmp_path_factory.mktemp("spamd")
    log = home / "spamd.log"
    port = free_port()
    args = [
        spamd,
        f"--listen=127.0.0.1:{port}",
        "--allowed-ips=127.0.0.1",
        "--local",
        "--nouser-config",
        f"--helper-home-dir={home}",
        "--min-children=1",
        "--max-children=2",
        "--min-spare=1",
        "--max-spare=1",
        f"--syslog={log}",
        "--allow-tell",
    ]
    # Its own Bayes database (TELL writes it), not the one in the spamd user's home.
    # Under /tmp itself: the children must reach it, and pytest's base directory is
    # private to us.
    bayes = Path(tempfile.mkdtemp(prefix="mta-test-bayes-"))
    args.append(f"--cf=bayes_path {bayes / 'bayes'}")
    if os.geteuid() == 0:
        # spamd refuses to run children as root: give them the Debian user.
        user = "debian-spamd" if _user_exists("debian-spamd") else "nobody"
        for path in (home, bayes):
            os.chown(path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        args += [f"--username={user}", f"--groupname={_group_of(user)}"]
    out = open(home / "stdout.log", "wb")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=home)
    _wait(process, port, b"PING SPAMC/1.5\r\n\r\n", b"PONG", home / "stdout.log")
    yield Daemon(f"127.0.0.1:{port}", port, process, log, bayes)
    _stop(process)
    out.close()
    shutil.rmtree(bayes, ignore_errors=True)


def bayes_counts(daemon: Daemon) -> tuple[int, int]:
    """(nspam, nham) of `spamd_server`'s Bayes database, as `sa-learn --dump magic`
    reads it (0, 0 before anything was learned)."""
    if not (daemon.bayes / "bayes_toks").exists():
        return 0, 0
    out = subprocess.run(
        [require_tool("sa-learn"), "--dump", "magic", f"--dbpath={daemon.bayes}"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("nspam", "nham"):
            counts[fields[-1]] = int(fields[2])
    return counts["nspam"], counts["nham"]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_of(user: str) -> str:
    import grp

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def write_clamd_config(directory: Path, port: int) -> Path:
    """A clamd.conf (and its signature database) under `directory`."""
    db = directory / "db"
    db.mkdir(parents=True, exist_ok=True)
    (db / "mta-test.hdb").write_text(
        f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:MTA.Test.EICAR\n"  # noqa: S324
    )
    (db / "mta-test.ndb").write_text(f"MTA.Test.Marker:0:*:{MARKER.hex()}\n")
    conf = directory / "clamd.conf"
    conf.write_text(
        "\n".join(
            [
                "Foreground yes",
                f"DatabaseDirectory {db}",
                f"TCPSocket {port}",
                "TCPAddr 127.0.0.1",
                f"LocalSocket {directory / 'clamd.sock'}",
                f"LogFile {directory / 'clamd.log'}",
                f"PidFile {directory / 'clamd.pid'}",
                "MaxThreads 4",
                "StreamMaxLength 1M",
                "SelfCheck 0",
                "",
            ]
        )
    )
    return conf


@pytest.fixture(scope="session")
def clamd_server(tmp_path_factory):
    clamd = require_tool("clamd")
    # A short directory name: the unix socket path must stay under 108 bytes.
    directory = Path(tmp_path_factory.mktemp("clamd"))
    port = free_port()
    conf = write_clamd_config(directory, port)
    if os.geteuid() == 0:
        # clamd drops to its User (clamav by default) and must read its files.
        os.chmod(directory, 0o755)
    out = open(directory / "stdout.log", "wb")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [clamd, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, cwd=directory
    )
    _wait(process, port, b"zPING\0", b"PONG", directory / "stdout.log")
    yield Daemon(f"127.0.0.1:{port}", port, process, directory / "clamd.log")
    _stop(process)
    out.close()


@pytest.fixture
def clamd_socket(clamd_server) -> str:
    return str(Path(clamd_server.log).parent / "clamd.sock")
