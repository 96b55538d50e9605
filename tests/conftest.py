"""Shared test fixtures: a real `twistd mta` subprocess and external-tool checks.

Nothing here imports or touches the reactor; pytest-twisted owns it.

- `require_tool("swaks")`: skip when a binary is missing, but fail under CI (CI=true),
  where .ci/run has installed it and a missing tool is a broken build, not a reason
  to skip.
- `mta_server`: `twistd -n mta --config <generated>` on free loopback ports with its
  data in tmp_path, ready (it greeted on the SMTP port) when the test starts, stopped
  by its own pid afterwards; its log is printed when the test failed.
- `mta_server_factory(config=..., start=True)`: the same with extra config, e.g.
  `{"relay_networks": ["127.0.0.0/8"], "limits": {"max_recipients": 2}}`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0  # seconds for twistd to start listening (cert generation, imports)
STOP_TIMEOUT = 30.0  # seconds to wait after SIGTERM before SIGKILL

# Runs twistd from the interpreter running the tests, so each virtualenv tests its own
# Twisted. `python -m twisted` is `twist`, not `twistd`, so call the twistd script's
# entry point directly (the same in Twisted 22.4 and 26).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
MTA_ADMIN = [sys.executable, "-c", "import sys; from mta.admin.cli import main; sys.exit(main())"]


# --------------------------------------------------------------------------- tools


def require_tool(name: str) -> str:
    """The path of binary `name`; skip the test without it (fail under CI)."""
    path = shutil.which(name) or _sbin(name)
    if path:
        return path
    reason = f"{name!r} is not installed (.ci/run installs it: see its apt-get line)"
    print(reason)
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _sbin(name: str) -> str | None:
    # smtp-source and smtp-sink live in /usr/sbin, often not on a user's PATH.
    for directory in ("/usr/sbin", "/sbin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


# --------------------------------------------------------------------------- ports, TOML


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ephemeral ports that were free a moment ago (held together, closed)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago."""
    return free_ports(1, host)[0]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """A small TOML writer for test configs: scalars, lists, tables, arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []

    def emit(prefix: str, table: Mapping[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, Mapping):
                tables.append((f"{prefix}{key}", value))
            elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                for item in value:
                    tables.append((f"[{prefix}{key}]", item))
            else:
                lines.append(f"{key} = {_toml_value(value)}")

    emit("", data)
    while tables:
        name, table = tables.pop(0)
        lines.append(f"\n[{name}]")
        nested_prefix = name.strip("[]") + "."
        for key, value in table.items():
            if isinstance(value, Mapping):
                tables.insert(0, (f"{nested_prefix}{key}", value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- the server


class MtaServer:
    """A `twistd -n mta` subprocess on loopback ports, its config and data in `root`."""

    def __init__(self, root: Path, config: Mapping[str, Any] | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.datadir = root / "var"
        self.config_path = root / "mta.toml"
        self.log_path = root / "twistd.log"
        self.host = "127.0.0.1"
        ports = free_ports(4, self.host)
        self.smtp_port, self.submission_port, self.smtps_port, self.http_port = ports
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.config = _merge(self.default_config(), config or {})
        self.config_path.write_text(to_toml(self.config))

    def default_config(self) -> dict[str, Any]:
        return {
            "hostname": "mx.example.test",
            "datadir": str(self.datadir),
            "local_domains": ["localhost", "example.test"],
            "postmaster": "postmaster@localhost",
            "listener": [
                {"name": "smtp", "address": f"{self.host}:{self.smtp_port}", "tls": "starttls", "auth": "optional"},
                {"name": "submission", "address": f"{self.host}:{self.submission_port}", "tls": "required", "auth": "required"},
                {"name": "smtps", "address": f"{self.host}:{self.smtps_port}", "tls": "implicit", "auth": "required"},
            ],
            "http": {"address": f"{self.host}:{self.http_port}"},
            "log": {"format": "json", "level": "debug"},
        }  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The checkout first, so twisted.plugins finds twisted/plugins/mta_plugin.py
        # whatever kind of editable install the venv has.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, timeout: float = READY_TIMEOUT) -> MtaServer:
        if self.running:
            raise RuntimeError(f"mta already running as pid {self.pid}")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "mta", "--config", str(self.config_path)],
                cwd=self.root,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in pytest does not hit it first
            )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (bounded) until SMTP greets with 220 and the other ports accept."""
        deadline = time.monotonic() + timeout
        pending = [self.smtp_port, self.submission_port, self.smtps_port]
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(
                    f"twistd mta exited with {code} before it was ready:\n{self.log()}"
                )
            try:
                if pending and pending[0] == self.smtp_port:
                    greeting = self._greeting()
                    if not greeting.startswith(b"220"):
                        raise RuntimeError(f"unexpected SMTP greeting {greeting!r}")
                else:
                    with socket.create_connection((self.host, pending[0]), timeout=2):
                        pass
                pending.pop(0)
                if not pending:
                    return
                continue
            except OSError as e:
                last_error = e
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(
            f"twistd mta not ready after {timeout:.0f}s (port {pending[0]}: {last_error}):\n{self.log()}"
        )

    def _greeting(self) -> bytes:
        with socket.create_connection((self.host, self.smtp_port), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            return data

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to our own pid, SIGKILL after `timeout`; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"mta pid {self.proc.pid} ignored SIGTERM for {timeout}s; SIGKILL")
                self.kill9()
        return self.proc.returncode

    def kill9(self) -> int | None:
        """SIGKILL, as in a crash; the exit status (-9)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def restart(self, timeout: float = READY_TIMEOUT) -> MtaServer:
        """Stop (gracefully, if still running) and start on the same ports and data."""
        self.stop()
        return self.start(timeout)

    def admin(self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60):
        """Run `mta-admin --config <ours> ARGS...`; a CompletedProcess with text output."""
        return subprocess.run(
            [*MTA_ADMIN, "--config", str(self.config_path), *args],
            cwd=self.root,
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def maildir(self, address: str) -> Path:
        """`<datadir>/mail/<domain>/<localpart>/` for `address` (DESIGN.md section 3)."""
        local, _, domain = address.rpartition("@")
        return self.datadir / "mail" / domain.lower() / local

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"


# --------------------------------------------------------------------------- fixtures


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets fixtures know whether the test failed (item.rep_call.failed).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def _failed(request) -> bool:
    return any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


@pytest.fixture
def mta_server_factory(tmp_path, request) -> Iterator[Callable[..., MtaServer]]:
    """`make(config=None, start=True, name="mta")` -> a started MtaServer."""
    servers: list[MtaServer] = []

    def make(
        config: Mapping[str, Any] | None = None, *, start: bool = True, name: str = "mta"
    ) -> MtaServer:
        server = MtaServer(tmp_path / name, config)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        code = server.stop()
        if _failed(request):
            print(f"----- twistd mta log ({server.log_path}, exit {code}) -----")
            print(server.log())


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (tests/pg.py)."""
    from tests.pg import fresh_database

    with fresh_database() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", "postgresql"])
def db_location(request, tmp_path) -> str:
    """Where `mta.db` keeps its tables, once per engine: an SQLite file under
    tmp_path, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "mta.db")
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def mta_server(mta_server_factory) -> MtaServer:
    """A running `twistd -n mta` on free loopback ports, data in tmp_path."""
    return mta_server_factory()
