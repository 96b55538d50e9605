""".ci/install-debian-deps says what it installs and why before installing anything,
and README.rst's quick start says that `make test` as root runs it."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / ".ci" / "install-debian-deps"
APT_LISTS = sorted((REPO_ROOT / ".ci" / "apt").glob("*.txt"))


def listed() -> str:
    # Never run the script without --list from a test: as root it would apt-get install.
    assert "--list" in SCRIPT.read_text(), "install-debian-deps has no --list"
    result = subprocess.run(
        ["bash", str(SCRIPT), "--list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_list_is_printed_with_its_comments_and_packages():
    out = listed()
    assert APT_LISTS
    for path in APT_LISTS:
        assert f".ci/apt/{path.name}:" in out
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        assert lines[0].startswith("#"), f"{path.name} does not start with a comment saying why"
        for line in lines:
            if line.startswith("#"):
                assert line in out
            else:
                assert line.split()[0] in out.split(), line


def test_the_count_is_of_distinct_packages():
    out = listed()
    packages = {
        line.split()[0]
        for path in APT_LISTS
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert f"{len(packages)} Debian packages" in out


def test_the_summary_comes_before_any_apt_get():
    text = SCRIPT.read_text()
    body = text[text.index("set -euo pipefail") :]
    assert body.index("summary\n") < body.index('"${APT[@]}" update')


def test_readme_quick_start_says_make_test_installs_debian_packages():
    readme = (REPO_ROOT / "README.rst").read_text()
    quick = readme[readme.index("Quick start") : readme.index("Configuration\n---")]
    assert "make run" in quick and "make test" in quick
    assert "bash .ci/install-debian-deps --list" in quick
    assert "as root" in quick
