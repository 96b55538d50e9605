"""The package as pip installs it: sdist -> wheel -> a fresh virtualenv, not editable.

Why a test: `make venv` installs the checkout in editable (compat) mode, which puts the
checkout itself on sys.path, so `twistd mta` worked there even while the wheel left
twisted/plugins/mta_plugin.py out ("Unknown command: mta" after `pip install .`).
This builds the sdist from a clean copy of the tree, the wheel from that sdist (so
both must carry the plugin), installs the wheel into a new virtualenv with its
dependencies from the package index, and runs the installed `twistd mta` from a
directory where the checkout is not importable: `--help`, then a real server on free
loopback ports that takes one message into a Maildir.

The wheel and the virtualenv are built once per test session.  Building the wheel
and installing the dependencies need the package index: when pip cannot reach it the
tests skip with pip's reason, and under CI=true they fail instead (.ci/run has the
network, and this is its only non-editable install).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import READY_TIMEOUT, REPO_ROOT, MtaServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PLUGIN = "twisted/plugins/mta_plugin.py"
PIP_TIMEOUT = 600  # seconds for one pip run (downloads on a slow mirror)
DELIVERY_TIMEOUT = 60.0
# What pip prints when it cannot talk to the index (urllib3 / requests wording).
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "connection broken by",
    "Max retries exceeded",
    "ProxyError",
    "Could not fetch URL",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    # An isolated build could not get setuptools: the index is unreachable (pip does
    # not repeat the inner pip's connection errors).
    "to install build dependencies did not run successfully",
)
# Left out of the copy the sdist is built from (what `make deb` leaves out too).
TOP_LEVEL_SKIP = {".git", "var", "build", "dist", ".pytest_cache", ".ruff_cache"}


# --------------------------------------------------------------------------- helpers


def clean_env() -> dict[str, str]:
    """Our environment without anything that would put the checkout or the test
    virtualenv on the installed package's sys.path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONUNBUFFERED="1")
    return env


def no_index(reason: str) -> None:
    print(reason)
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pip(python: str, *args: str, what: str, cwd: Path) -> str:
    """`python -m pip ARGS`; its output.  Skips (fails under CI) when the index is
    unreachable; fails on any other error."""
    command = [python, "-m", "pip", *args]
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        no_index(f"{what}: pip did not finish in {PIP_TIMEOUT} s (is the package index reachable?)")
    output = result.stdout + result.stderr
    if result.returncode != 0:
        if any(marker in output for marker in NETWORK_ERRORS):
            lines = [line for line in output.splitlines() if "Location 'file:" not in line]
            no_index(f"{what}: pip cannot reach the package index:\n" + "\n".join(lines[-12:]))
        pytest.fail(
            f"{what}: {' '.join(command)} exited {result.returncode}:\n{output[-4000:]}",
            pytrace=False,
        )
    return output


def run(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def copy_tree(dest: Path) -> None:
    """The checkout as a release would see it: no VCS, virtualenvs, builds or caches."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n == "dropin.cache"}
        skip |= {n for n in names if n.endswith((".egg-info", ".pyc"))}
        if Path(directory) == REPO_ROOT:
            skip |= {n for n in names if n in TOP_LEVEL_SKIP or n.startswith(".venv")}
        return skip

    shutil.copytree(REPO_ROOT, dest, ignore=ignore)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, Path]:
    """{"sdist": ..., "wheel": ...}: the sdist of a clean copy, the wheel built from it."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist = root / "src", root / "dist"
    copy_tree(src)
    dist.mkdir()
    # setuptools' own PEP 517 hook (no download needed) for the sdist ...
    result = run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
            str(dist),
        ],
        cwd=src,
    )
    assert result.returncode == 0, f"building the sdist failed:\n{result.stderr[-4000:]}"
    [sdist] = dist.glob("mta-*.tar.gz")
    # ... and the wheel from that sdist, the way pip builds any sdist (isolated build).
    pip(
        sys.executable,
        "wheel",
        "--no-deps",
        "-w",
        str(dist),
        str(sdist),
        what="pip wheel",
        cwd=root,
    )
    [wheel] = dist.glob("mta-*.whl")
    return {"sdist": sdist, "wheel": wheel}


@pytest.fixture(scope="session")
def venv(built, tmp_path_factory) -> Path:
    """A fresh virtualenv (no system site-packages) with the wheel and its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    result = run([sys.executable, "-m", "venv", str(venv)], cwd=root)
    assert result.returncode == 0, f"python -m venv failed:\n{result.stdout}{result.stderr}"
    python = str(venv / "bin" / "python")
    pip(python, "install", str(built["wheel"]), what="pip install <wheel>", cwd=root)
    return venv


# --------------------------------------------------------------------------- what is built


def test_wheel_and_sdist_carry_the_twistd_plugin(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        in_wheel = set(wheel.namelist())
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for names in (in_wheel, in_sdist):
        assert PLUGIN in names
        assert "mta/__init__.py" in names and "mta/tap.py" in names
        assert any(n.startswith("mta/schema/") and n.endswith(".sql") for n in names)
        # twisted/ and twisted/plugins/ belong to Twisted: never an __init__.py there.
        assert not {"twisted/__init__.py", "twisted/plugins/__init__.py"} & names
        assert not [n for n in names if "dropin.cache" in n or "__pycache__" in n]
    assert not [n for n in in_wheel if n.startswith(("tests/", "bench/", "debian/"))]
    assert "etc/mta.toml" in in_sdist


# --------------------------------------------------------------------------- what is installed


def test_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    result = run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, mta, twisted.plugins.mta_plugin as p;"
            " print(mta.__file__); print(p.__file__); print(sys.path)",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    mta_file, plugin_file, path = result.stdout.splitlines()
    assert Path(mta_file).is_relative_to(venv), mta_file
    assert Path(plugin_file).is_relative_to(venv), plugin_file
    assert str(REPO_ROOT) not in path


def test_installed_twistd_knows_mta(venv, tmp_path):
    result = run([str(venv / "bin" / "twistd"), "mta", "--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown command" not in result.stdout + result.stderr
    assert "--config" in result.stdout and "--datadir" in result.stdout
    admin = run([str(venv / "bin" / "mta-admin"), "--help"], cwd=tmp_path)
    assert admin.returncode == 0 and "check-config" in admin.stdout
    # The plugin cache twistd wrote knows the plugin.
    [cache] = (venv / "lib").glob("python3*/site-packages/twisted/plugins/dropin.cache")
    assert b"mta_plugin" in cache.read_bytes()


def test_installed_twistd_works_when_the_plugin_cache_cannot_be_written(venv, tmp_path):
    [plugins] = (venv / "lib").glob("python3*/site-packages/twisted/plugins")
    cache = plugins / "dropin.cache"
    cache.unlink(missing_ok=True)
    cache.mkdir()  # unreadable and unwritable as a file, even for root
    try:
        result = run([str(venv / "bin" / "twistd"), "mta", "--help"], cwd=tmp_path)
    finally:
        cache.rmdir()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--datadir" in result.stdout


class InstalledServer(MtaServer):
    """`<venv>/bin/twistd -n --pidfile= mta --config ... --datadir ...` from the wheel."""

    def __init__(self, root: Path, venv: Path, config: Mapping[str, Any] | None = None):
        self.venv = venv
        super().__init__(root, config)

    def default_config(self) -> dict[str, Any]:
        config = super().default_config()
        del config["datadir"]  # given with --datadir
        config["log"] = {"format": "text", "level": "info"}  # what `make run` writes
        return config

    def env(self) -> dict[str, str]:
        return clean_env()

    def start(self, timeout: float = READY_TIMEOUT) -> InstalledServer:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "twistd"),
                    "-n",
                    "--pidfile=",
                    "mta",
                    "--config",
                    str(self.config_path),
                    "--datadir",
                    str(self.datadir),
                ],
                cwd=self.root,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout)
        return self


@pytest.fixture
def installed_server(venv, tmp_path):
    server = InstalledServer(tmp_path / "mta", venv)
    try:
        yield server.start()
    finally:
        code = server.stop()
        print(f"----- installed twistd mta log (exit {code}) -----\n{server.log()[-6000:]}")


def test_installed_server_takes_a_message_into_the_maildir(installed_server):
    server = installed_server
    message = b"From: a@remote.test\r\nSubject: from the wheel\r\n\r\nwheel body\r\n"
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        assert client.sendmail("a@remote.test", ["postmaster@localhost"], message) == {}
    new = server.maildir("postmaster@localhost") / "new"
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline and not (new.is_dir() and any(new.iterdir())):
        time.sleep(0.05)
    [delivered] = list(new.iterdir())
    assert delivered.read_bytes().endswith(message)
    log = server.log()
    assert "mta starting: hostname mx.example.test" in log
    assert "local domains" in log
    assert "unformattable" not in log
