"""etc/mta.toml: loads, documents every key config.py accepts, and the test fixture's
generated configs load too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import attrs

from mta import config as mta_config
from mta.config import load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "mta.toml"


def mentioned_keys(text: str) -> set[str]:
    """Dotted keys set or shown commented out (`# key = ...`), by table."""
    keys: set[str] = set()
    table = ""
    for line in text.splitlines():
        m = re.match(r"^#?\s*\[\[?([a-z0-9_.]+)\]\]?", line)
        if m:
            table = m.group(1)
            keys.add(table)
            continue
        m = re.match(r"^#?\s*([a-z_][a-z0-9_]*)\s*=", line)
        if m:
            keys.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return keys


def test_example_loads():
    cfg = load_config(str(EXAMPLE))
    assert cfg.source == str(EXAMPLE)
    assert cfg.hostname == "mx.example.test"
    assert [listener.name for listener in cfg.listeners] == ["smtp", "submission", "smtps"]
    assert "localhost" in cfg.local_domains


def test_example_datadir_is_the_checkouts_var():
    cfg = load_config(str(EXAMPLE))
    assert cfg.datadir == os.path.abspath(EXAMPLE.parent.parent / "var")


def test_example_values_are_the_defaults():
    """The example documents the defaults: a section left out behaves the same."""
    cfg = load_config(str(EXAMPLE))
    for name, cls in mta_config._SECTIONS.items():
        assert getattr(cfg, name) == cls(), f"[{name}] in etc/mta.toml differs from the default"
    assert cfg.listeners == mta_config.DEFAULT_LISTENERS


def test_example_mentions_every_key():
    keys = mentioned_keys(EXAMPLE.read_text())
    expected = {"hostname", "datadir", "local_domains", "relay_networks", "postmaster"}
    expected |= {f"listener.{k}" for k in ("name", "address", "tls", "auth")}
    for name, cls in mta_config._SECTIONS.items():
        expected |= {f"{name}.{field.name}" for field in attrs.fields(cls)}
    expected |= set(mta_config._RESERVED_SECTIONS)
    expected |= {"storage.s3"} | {f"storage.s3.{f.name}" for f in attrs.fields(mta_config.S3Config)}
    missing = sorted(expected - keys)
    assert not missing, f"etc/mta.toml does not document: {missing}"


def test_every_key_has_a_comment():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line) and not line.startswith(
            ("name", "address", "tls", "auth")
        ):
            above = lines[max(0, i - 4) : i]
            assert any(prev.startswith("#") for prev in above), f"no comment above {line!r}"


def test_example_parses_as_plain_toml():
    with open(EXAMPLE, "rb") as f:
        data = tomllib.load(f)
    assert isinstance(data["listener"], list)


def test_fixture_config_loads(mta_server_factory):
    server = mta_server_factory(
        {"relay_networks": ["127.0.0.0/8"], "limits": {"max_recipients": 3}}, start=False
    )
    cfg = load_config(str(server.config_path))
    assert cfg.datadir == str(server.datadir)
    assert {listener.port for listener in cfg.listeners} == {
        server.smtp_port,
        server.submission_port,
        server.smtps_port,
    }
    assert len({server.smtp_port, server.submission_port, server.smtps_port, server.http_port}) == 4
    assert cfg.http.address == f"127.0.0.1:{server.http_port}"
    assert cfg.limits.max_recipients == 3
    assert str(cfg.relay_networks[0]) == "127.0.0.0/8"
    assert cfg.log.format == "json"


def test_bench_config_loads(tmp_path):
    """The bench scripts write their config with bench/mta_config.sh; keep it valid."""
    helper = EXAMPLE.parent.parent / "bench" / "mta_config.sh"
    text = subprocess.run(
        ["bash", "-c", f'. "{helper}"; mta_bench_config "{tmp_path / "d"}" 20030 0'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = tmp_path / "bench.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.local_domains == ("bench.test",)
    assert cfg.listeners[0].address == "127.0.0.1:20030"
    assert cfg.listeners[0].tls == "none"
    assert cfg.http.address == "127.0.0.1:20031"


# -- the commands around it in the docs run as written -----------------------------

README = EXAMPLE.parent.parent / "README.rst"


def test_the_header_runs_twistd_without_a_pidfile():
    header = EXAMPLE.read_text().split("\n\n", 1)[0]
    assert "twistd -n --pidfile= mta --config etc/mta.toml" in header
    assert "mta-admin --config etc/mta.toml check-config" in header


def test_readme_console_logins_match_the_example():
    example_logins = set(re.findall(r"ssh -p 2222 (\w+)@127\.0\.0\.1", EXAMPLE.read_text()))
    readme_logins = set(re.findall(r"ssh -p 2222 (\w+)@127\.0\.0\.1", README.read_text()))
    assert example_logins and readme_logins == example_logins


def readme_admin_examples() -> list[str]:
    """README's literal `mta-admin --config etc/mta.toml ...` lines, comments cut."""
    commands = []
    for line in README.read_text().splitlines():
        command = re.sub(r"\s+#.*$", "", line.strip())
        if re.match(r"^(echo \S+ \| )?mta-admin --config etc/mta\.toml ", command):
            commands.append(command)
    return commands


def test_readme_admin_examples_run_as_written(tmp_path):
    """From a checkout-like directory: etc/mta.toml (its datadir is ../var), mta-admin
    on PATH as after `. .venv/bin/activate`."""
    commands = readme_admin_examples()
    assert any("user add --password-stdin bob@example.test" in c for c in commands)
    assert any("alias add sales@example.test" in c for c in commands)
    (tmp_path / "etc").mkdir()
    shutil.copy(EXAMPLE, tmp_path / "etc" / "mta.toml")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "mta-admin").exists(), "mta-admin is not installed next to python"
    env = {k: v for k, v in os.environ.items() if k != "MTA_CONFIG"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for command in commands:
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            env=env,
            input="s3cret-pass\ns3cret-pass\n",  # for the one that prompts
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,  # no terminal: getpass reads standard input
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
    listed = subprocess.run(
        ["bash", "-c", "mta-admin --config etc/mta.toml user list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "alice@example.test" in listed and "bob@example.test" in listed
    assert (tmp_path / "var" / "mta.db").exists()
