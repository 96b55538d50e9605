"""Fixtures for the mta-admin tests: a config file, `run(*argv)` calling
`mta.admin.cli.main` in-process, and a second connection to the database it writes.

(tests/admin/test_cli.py defines its own copies of these, which take precedence
there.)"""

from __future__ import annotations

import io
import sys

import pytest

from mta.admin import cli, common
from mta.db import Database

CONFIG = """\
hostname = "mx.example.test"
datadir = "data"
local_domains = ["example.test", "other.test"]
postmaster = "alice@example.test"

[auth]
time_cost = 1
memory_cost = 8
parallelism = 1
max_failures = 3
failure_window = 600
lockout_seconds = 900
"""


@pytest.fixture
def config_file(tmp_path, monkeypatch, request):
    """The test module's CONFIG (this one's when it has none), as --config."""
    path = tmp_path / "mta.toml"
    path.write_text(getattr(request.module, "CONFIG", CONFIG))
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a TTY, empty
    return str(path)


@pytest.fixture
def datadir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def run(config_file, capsys):
    """main() with --config; returns (exit status, stdout, stderr)."""

    def run(*argv: str, stdin: str | None = None):
        if stdin is not None:
            sys.stdin = io.StringIO(stdin)
        status = cli.main(["--config", config_file, *argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def db(datadir, run):
    run("user", "list")  # creates the database
    with Database(str(datadir / "mta.db")) as database:
        yield database
