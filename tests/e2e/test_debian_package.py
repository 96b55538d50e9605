"""The Debian package end to end: `make deb`, `apt-get install ./mta_*.deb`, run it the
way mta.service does, deliver a message, `apt-get purge mta` and keep queued mail.

Why a test and not a checklist: the package is where the code meets Debian 12's own
python3-* libraries, the twisted plugin cache trigger, the maintainer scripts (user,
data directory, generated configuration and certificate) and the unit's user and
working directory.  None of that is exercised by the virtualenv runs.

It installs and purges the real package on this machine, so it needs root on Debian
(CI): elsewhere it skips, and under CI=true it fails instead.  It refuses to touch a
machine where an mta package or /var/lib/mta already exists.  There is no systemd in
CI: the server is started with setpriv from the installed unit's ExecStart=, User=,
NoNewPrivileges=, AmbientCapabilities=, WorkingDirectory= and Environment=, on free
loopback ports (SMTP on a free one below 1024, which only the unit's capability lets
the mta user bind), and stopped by its own pid.  The .deb is built once per session.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import mta
from tests.conftest import REPO_ROOT, free_ports, require_tool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONF = Path("/etc/mta/mta.toml")
DATADIR = Path("/var/lib/mta")
TIMEOUT = 60.0  # seconds for the server to listen, or a message to arrive
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]
UNIT = Path("/lib/systemd/system/mta.service")
# What systemd gives a service before its Environment=; nothing from our virtualenv.
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": str(DATADIR)}
# setup.cfg install_requires -> the Debian 12 package providing it.  A new requirement
# must be added here and to debian/control's Depends (test_package_contents fails until).
DEBIAN_PACKAGE_OF = {
    "twisted": "python3-twisted",
    "attrs": "python3-attr",
    "zope.interface": "python3-zope.interface",
    "pyopenssl": "python3-openssl",
    "service-identity": "python3-service-identity",
    "cryptography": "python3-cryptography",
    "argon2-cffi": "python3-argon2",
    "prometheus-client": "python3-prometheus-client",
    "bcrypt": "python3-bcrypt",
    "pyasn1": "python3-pyasn1",
    "dnspython": "python3-dnspython",
    "dkimpy": "python3-dkim",
    "treq": "python3-treq",
    "botocore": "python3-botocore",
    "pyspf": "python3-spf",
    "authheaders": "python3-authheaders",
    "pynacl": "python3-nacl",
    "publicsuffix2": "python3-publicsuffix2",
    "authres": "python3-authres",
    "psycopg": "python3-psycopg",
}
# Depended on whether or not setup.cfg lists them yet (issue #5).
DEBIAN_DEPENDS = (
    "python3-twisted",
    "python3-openssl",
    "python3-service-identity",
    "python3-argon2",
    "python3-attr",
    "python3-zope.interface",
    "python3-dnspython",
    "python3-dkim",
    "python3-prometheus-client",
    "python3-treq",
)


def install_requires() -> list[str]:
    """The distribution names in setup.cfg's install_requires, lower case."""
    parser = configparser.ConfigParser()
    parser.read(REPO_ROOT / "setup.cfg")
    names = []
    for line in parser["options"]["install_requires"].splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.-]+)", line)
        if match:
            names.append(match.group(1).lower().replace("_", "-"))
    return names


def require(condition: bool, reason: str) -> None:
    """Skip unless `condition`; under CI (where it must hold) fail instead."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def run(cmd: list[str], *, check: bool = True, timeout: float = 600, **kw):
    """Run `cmd`, output captured as text; on failure the output is in the error."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def apt(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return run([*APT, *args], env=env)


def package_status() -> str:
    """`installed`, `config-files`, `not-installed` ... as dpkg knows mta."""
    proc = run(["dpkg-query", "-W", "-f=${db:Status-Status}", "mta"], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "not-installed"


def is_debian() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


# --------------------------------------------------------------------------- the .deb


@pytest.fixture(scope="session")
def deb(tmp_path_factory) -> Path:
    """`make deb` once per session: the built mta_<version>_all.deb (lintian passed)."""
    require(is_debian(), "builds a Debian package: needs Debian (apt-get, dpkg)")
    for tool in ("dpkg-buildpackage", "dh", "lintian", "make"):
        require_tool(tool)
    dist = tmp_path_factory.mktemp("deb")
    proc = run(["make", "--no-print-directory", "deb", f"DEB_DIST={dist}"], cwd=REPO_ROOT)
    print(proc.stdout[-3000:])
    debs = sorted(dist.glob("mta_*_all.deb"))
    assert len(debs) == 1, (debs, proc.stdout[-3000:], proc.stderr[-3000:])
    return debs[0]


def test_package_contents(deb):
    """The .deb ships our plugin module but no plugin cache and nothing of Twisted's."""
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert not [p for p in paths if p.endswith("dropin.cache")], listing
    plugins = "/usr/lib/python3/dist-packages/twisted/plugins/"
    assert {p for p in paths if p.startswith(plugins) and not p.endswith("/")} == {
        plugins + "mta_plugin.py"
    }
    assert "/usr/lib/python3/dist-packages/twisted/__init__.py" not in paths
    for path in (
        "/lib/systemd/system/mta.service",
        "/usr/bin/mta-admin",
        "/usr/lib/python3/dist-packages/mta/app.py",
        "/usr/share/mta/mta.toml",
    ):
        assert path in paths, path
    # /etc/mta/mta.toml is generated by postinst (ucf), not shipped: no conffile to edit.
    assert not [p for p in paths if p.startswith("/etc/")], listing

    fields = run(["dpkg-deb", "-f", str(deb), "Version", "Depends", "Architecture"]).stdout
    assert f"Version: {mta.__version__}" in fields, (fields, "debian/changelog vs mta")
    depends = {d.strip().split()[0] for d in fields.split("Depends:")[1].split("\n")[0].split(",")}
    assert set(DEBIAN_DEPENDS) <= depends, depends
    for name in install_requires():
        assert name in DEBIAN_PACKAGE_OF, f"setup.cfg requires {name}: map it to a Debian package"
        assert DEBIAN_PACKAGE_OF[name] in depends, (name, "missing from debian/control Depends")
    assert "Architecture: all" in fields

    control = Path(tempfile.mkdtemp(prefix="mta-deb-control."))
    try:
        run(["dpkg-deb", "-e", str(deb), str(control)])
        assert "activate-noawait twisted-plugins-cache" in (control / "triggers").read_text()
    finally:
        shutil.rmtree(control)


# --------------------------------------------------------------------------- installed


@pytest.fixture
def clean_machine(deb) -> Iterator[None]:
    """Root on a machine without mta; afterwards purged, with its data and user gone."""
    require(os.geteuid() == 0, "installs a Debian package: needs root")
    require_tool("setpriv")
    require(
        package_status() == "not-installed" and not DATADIR.exists() and not CONF.exists(),
        f"an mta package, {DATADIR} or {CONF} is already here; this test would replace it",
    )
    try:
        yield
    finally:
        if package_status() != "not-installed":
            run([*APT, "purge", "mta"], check=False)
        shutil.rmtree(DATADIR, ignore_errors=True)
        shutil.rmtree(CONF.parent, ignore_errors=True)
        with contextlib.suppress(KeyError):
            pwd.getpwnam("mta")
            run(["deluser", "--quiet", "--system", "mta"], check=False)
        run(["delgroup", "--quiet", "--system", "mta"], check=False)


def unit_settings(text: str) -> dict[str, list[str]]:
    """`Key=value` lines of a systemd unit: key -> every value, in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class PackagedServer:
    """`twistd3 mta` started the way mta.service starts it, with another config file."""

    def __init__(self, unit: dict[str, list[str]], config: Path, smtp_port: int, log: Path):
        (exec_start,) = unit["ExecStart"]
        argv = shlex.split(exec_start)
        assert argv.count(str(CONF)) == 1, exec_start
        argv[argv.index(str(CONF))] = str(config)
        (user,), (group,) = unit["User"], unit["Group"]
        privs = ["--no-new-privs"] if unit.get("NoNewPrivileges") == ["yes"] else []
        for caps in unit.get("AmbientCapabilities", []):
            names = ",".join("+" + c.lower().removeprefix("cap_") for c in caps.split())
            privs += [f"--inh-caps={names}", f"--ambient-caps={names}"]
        self.argv = [
            "setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", *privs, "--", *argv
        ]  # fmt: skip
        self.env = dict(BASE_ENV)
        for assignments in unit.get("Environment", []):
            self.env.update(a.split("=", 1) for a in shlex.split(assignments))
        (self.cwd,) = unit["WorkingDirectory"]
        self.smtp_port = smtp_port
        self.log_path = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd3 mta exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=5) as s:
                    s.settimeout(5)
                    greeting = s.recv(512)
                    if greeting.startswith(b"220"):
                        return
            time.sleep(0.05)
        raise AssertionError(f"twistd3 mta not listening after {TIMEOUT}s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # setpriv exec()s: this is twistd's pid
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def free_privileged_port() -> int:
    """A loopback port below 1024 that nothing listens on (we are root: we may bind it)."""
    for port in range(1023, 511, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port between 512 and 1023")


def loopback_config(installed: str, ports: dict[str, int]) -> str:
    """The installed config with its listeners and HTTP moved to free loopback ports."""
    text = installed
    for old, new in ports.items():
        text, n = re.subn(rf'address = "{re.escape(old)}"', f'address = "127.0.0.1:{new}"', text)
        assert n == 1, (old, installed)
    return text


def wait_for_files(directory: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + TIMEOUT
    files: list[Path] = []
    while time.monotonic() < deadline:
        if directory.is_dir():
            files = sorted(p for p in directory.iterdir() if p.is_file())
            if len(files) >= count:
                return files
        time.sleep(0.05)
    raise AssertionError(f"{directory}: {len(files)} files after {TIMEOUT}s, wanted {count}")


def queue_entries() -> list[Path]:
    """Undelivered messages: files in any queue/.../active/ (not their .status files)."""
    return sorted(
        p
        for p in (DATADIR / "queue").rglob("*")
        if p.is_file() and p.parent.name == "active" and not p.name.endswith(".status")
    )


def send(port: int, recipient: str, subject: str) -> bytes:
    """One message over STARTTLS; the DER certificate the server presented."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        cert = client.sock.getpeercert(binary_form=True)
        client.sendmail(
            "sender@remote.test",
            [recipient],
            f"From: sender@remote.test\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nHi.\r\n",
        )
    return cert


def owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


def test_install_run_deliver_purge(deb, clean_machine, tmp_path):
    # --- install: user, data dir, generated config and certificate, plugin cache
    out = apt("install", str(deb)).stdout
    print(out[-2000:])
    assert package_status() == "installed"
    user = pwd.getpwnam("mta")
    assert (user.pw_dir, user.pw_shell) == (str(DATADIR), "/usr/sbin/nologin")
    assert owner(DATADIR) == "mta" and stat.S_IMODE(DATADIR.stat().st_mode) == 0o750

    text = CONF.read_text()
    config = tomllib.loads(text)
    domain = config["hostname"]
    assert "@HOSTNAME@" not in text and domain and domain == domain.lower()
    assert config["local_domains"][0] == domain
    assert config["postmaster"] == f"postmaster@{domain}"
    assert stat.S_IMODE(CONF.stat().st_mode) == 0o640 and owner(CONF) == "root"

    cert, key = DATADIR / "tls/selfsigned.crt", DATADIR / "tls/selfsigned.key"
    assert owner(cert) == owner(key) == "mta"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    # The unit: what issue #5 asks of it.  The server below is started from it.
    unit = unit_settings(UNIT.read_text())
    assert unit["ExecStart"] == [
        "/usr/bin/twistd3 --nodaemon --pidfile= mta --config /etc/mta/mta.toml"
    ]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for key, value in {
        "User": "mta",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": str(DATADIR),
        "PrivateTmp": "yes",
        "Restart": "on-failure",
    }.items():
        assert unit.get(key) == [value], (key, unit.get(key))

    # python3-twisted's trigger rebuilt its plugin cache, with our plugin in it.
    caches = list(Path("/usr/lib/python3/dist-packages/twisted/plugins").glob("dropin.cache"))
    assert caches and b"mta_plugin" in caches[0].read_bytes()

    check = run(
        ["setpriv", "--reuid=mta", "--regid=mta", "--init-groups", "--",
         "mta-admin", "--config", str(CONF), "check-config"],
        env=BASE_ENV, cwd=DATADIR, check=False,
    )  # fmt: skip
    assert check.returncode == 0, (check.stdout, check.stderr)

    # --- run as the unit does, on loopback ports, with the packaged config otherwise
    submission, smtps, http = free_ports(3)
    smtp = free_privileged_port()
    test_dir = Path(tempfile.mkdtemp(prefix="mta-deb-test."))
    test_dir.chmod(0o755)  # the mta user reads the config from here
    test_config = test_dir / "mta.toml"
    test_config.write_text(
        loopback_config(
            text,
            {"0.0.0.0:25": smtp, "0.0.0.0:587": submission, "0.0.0.0:465": smtps,
             "127.0.0.1:8081": http},
        )
    )  # fmt: skip
    test_config.chmod(0o644)
    server = PackagedServer(unit, test_config, smtp, tmp_path / "twistd3.log")
    try:
        server.start()
        presented = send(smtp, f"postmaster@{domain}", "packaged")
        # The certificate postinst made is the one the server uses: one place.
        assert presented == ssl.PEM_cert_to_DER_cert(cert.read_text())
        maildir = DATADIR / "mail" / domain / "postmaster"
        (delivered,) = wait_for_files(maildir / "new", 1)
        assert owner(delivered) == "mta"
        assert b"Subject: packaged" in delivered.read_bytes()

        # A second message that cannot be delivered (its Maildir is not writable for
        # the mta user: a transient error) stays queued.
        (maildir / "tmp").chmod(0o500)
        send(smtp, f"postmaster@{domain}", "queued")
        # twistd re-raises the signal after a clean shutdown; systemd counts it as clean.
        assert server.stop() in (0, -signal.SIGTERM), server.log()
        assert len(queue_entries()) == 1, server.log()
        assert len(list((maildir / "new").iterdir())) == 1

        # Logs are JSON lines ([log] format = "json" in the packaged config).
        events = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        assert events and all({"timestamp", "level", "event"} <= e.keys() for e in events)
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()
        shutil.rmtree(test_dir, ignore_errors=True)

    # --- purge: the config and the rest of the data go, the mail stays and we are told
    proc = apt("purge", "mta")
    said = proc.stdout + proc.stderr
    print(said[-2000:])
    assert package_status() == "not-installed"
    assert not CONF.exists() and not CONF.parent.exists()
    assert f"kept {DATADIR}/queue" in said and f"kept {DATADIR}/mail" in said
    assert len(queue_entries()) == 1
    assert len(list((maildir / "new").iterdir())) == 1
    assert sorted(p.name for p in DATADIR.iterdir()) == ["mail", "queue"]

    # --- reinstall over the kept data: postinst copes with an existing user and dir
    apt("install", str(deb))
    assert package_status() == "installed" and CONF.exists() and len(queue_entries()) == 1

    # --- purge with no mail left removes /var/lib/mta entirely
    shutil.rmtree(DATADIR / "queue")
    shutil.rmtree(DATADIR / "mail")
    proc = apt("purge", "mta")
    assert "kept" not in proc.stdout + proc.stderr
    assert not DATADIR.exists() and not CONF.exists()
