"""Fixtures for the mta-admin tests: a config file, `run(*argv)` calling
`mta.admin.cli.main` in-process, and a second connection to the database it writes.

(tests/admin/test_cli.py defines its own copies of these, which take precedence
there.)"""

from __future__ import annotations

import io
import sys

import pytest

from mta.admin import cli, common
from mta.config import load_config
from mta.db import Database, database_location, is_postgres

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
def db(config_file, run):
    """The database the config file names (SQLite in datadir unless it sets
    [database] dsn: see `on_each_engine`)."""
    run("user", "list")  # creates the database
    with Database(database_location(load_config(config_file))) as database:
        yield database


@pytest.fixture
def on_each_engine(config_file, db_location):
    """The config file, with `[database] dsn` for the PostgreSQL run of a test
    parametrized by `db_location`.  A module uses it as its `config_file`."""
    if is_postgres(db_location):
        with open(config_file, "a") as f:
            f.write(f'\n[database]\ndsn = "{db_location}"\n')
    return config_file
