"""debian/mta.postinst's mail_hostname (the hostname written into /etc/mta/mta.toml)
chooses the same name as mta.config.default_hostname (the server's default)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mta.config import default_hostname
from tests.conftest import REPO_ROOT

POSTINST = REPO_ROOT / "debian" / "mta.postinst"


def mail_hostname_function() -> str:
    text = POSTINST.read_text()
    start = text.index("mail_hostname() {")
    end = text.index("\n}\n", start) + 3
    return text[start:end]


def run_mail_hostname(tmp_path: Path, fqdn: str, host: str) -> str:
    """mail_hostname with a fake `hostname` that answers `fqdn` to --fqdn."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "hostname"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --fqdn ]; then printf "%s\\n" "{fqdn}"; else printf "%s\\n" "{host}"; fi\n'
    )
    fake.chmod(0o755)
    script = mail_hostname_function() + "mail_hostname\n"
    result = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.parametrize(
    "fqdn, host",
    [
        ("mx.example.test", "mx"),
        ("localhost", "box7"),
        ("localhost.localdomain", "box7.example.test"),
        ("ip6-localhost", "box7"),
        ("", "box7"),
        ("box7", "box7.example.test"),
        ("box7", "box7"),
        ("Box7.Example.Test", "box7"),
        ("localhost", "localhost"),
        ("", ""),
    ],
)
def test_postinst_picks_the_servers_default_hostname(tmp_path, fqdn, host):
    if shutil.which("sh") is None:
        pytest.skip("no sh")
    assert run_mail_hostname(tmp_path, fqdn, host) == default_hostname(lambda: fqdn, lambda: host)
