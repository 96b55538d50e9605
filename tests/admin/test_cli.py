"""Tests for `mta-admin` (mta.admin.cli): called as `main([...])`, and once as a
subprocess (`python -m mta.admin`) to check the real entry point."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import argon2
import pytest

import mta
from mta.admin import cli
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
"""


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# config_file, datadir, run and db come from tests/admin/conftest.py (with CONFIG above).


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("mta-admin: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


# -- user add --------------------------------------------------------------------


def test_user_add_with_password_from_stdin(run, db, datadir):
    status, out, err = run("user", "add", "Bob@Example.TEST", "--password-stdin", stdin="s3cret\n")
    assert (status, err) == (0, "")
    assert "added bob@example.test" in out
    user = db.get_user("bob@example.test")
    assert user.password_hash.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert argon2.PasswordHasher().verify(user.password_hash, "s3cret")
    for sub in ("tmp", "new", "cur"):
        assert (datadir / "mail" / "example.test" / "bob" / sub).is_dir()
    [entry] = db.audit_entries()
    assert (entry.action, entry.username, entry.success) == ("user.add", "bob@example.test", True)
    assert entry.details["password"] is True and entry.user_agent == "mta-admin"


def test_user_add_without_tty_or_flag_creates_a_mailbox_only(run, db):
    status, out, _ = run("user", "add", "bob@example.test")
    assert status == 0 and "cannot log in" in out
    assert db.get_user("bob@example.test").password_hash is None


def test_user_add_no_password(run, db):
    assert run("user", "add", "bob@example.test", "--no-password", stdin="ignored\n")[0] == 0
    assert db.get_user("bob@example.test").password_hash is None


def test_user_add_prompts_twice_on_a_tty(run, db, monkeypatch):
    answers = iter(["pw1", "pw1"])
    prompts = []
    monkeypatch.setattr("getpass.getpass", lambda prompt: prompts.append(prompt) or next(answers))
    sys.stdin = FakeTTY("")
    status, _, _ = run("user", "add", "bob@example.test")
    assert status == 0 and len(prompts) == 2
    assert argon2.PasswordHasher().verify(db.get_user("bob@example.test").password_hash, "pw1")


def test_user_add_refuses_mismatched_prompts(run, db, monkeypatch):
    answers = iter(["pw1", "pw2"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    sys.stdin = FakeTTY("")
    status, _, err = run("user", "add", "bob@example.test")
    assert status == 1
    assert_one_line_error(err, "do not match")
    assert db.get_user("bob@example.test") is None


def test_password_is_never_accepted_in_argv(run, db):
    status, _, err = run("user", "add", "bob@example.test", "s3cret")
    assert status == 2 and "unrecognized arguments" in err
    assert db.get_user("bob@example.test") is None


def test_user_add_duplicate_is_a_clear_error_and_audited(run, db):
    run("user", "add", "bob@example.test")
    status, _, err = run("user", "add", "BOB@example.test")
    assert status == 1
    assert_one_line_error(err, "already exists")
    last = db.audit_entries()[-1]
    assert (last.action, last.success) == ("user.add", False)


@pytest.mark.parametrize(
    "email, fragment",
    [
        ("bob@elsewhere.test", "not a local domain"),
        ("bob", "not a valid user address"),
        ("../x@example.test", "invalid local part"),
        ("a/b@example.test", "may only contain"),
        (".hidden@example.test", "invalid local part"),
        ("a*b@example.test", "may only contain"),
    ],
)
def test_user_add_bad_address(run, db, email, fragment, datadir):
    status, _, err = run("user", "add", email)
    assert status == 1
    assert_one_line_error(err, fragment)
    assert db.list_users() == []
    assert not (datadir / "mail").exists()


def test_user_add_with_datadir_override(run, tmp_path):
    other = tmp_path / "elsewhere"
    status, _, _ = run("--datadir", str(other), "user", "add", "bob@example.test")
    assert status == 0
    assert (other / "mail" / "example.test" / "bob" / "new").is_dir()
    with Database(str(other / "mta.db")) as db:
        assert db.get_user("bob@example.test") is not None


def test_options_are_accepted_after_the_subcommand(config_file, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["user", "add", "bob@example.test", "--config", config_file]) == 0
    assert cli.main(["user", "list", "--config", config_file]) == 0
    assert "bob@example.test" in capsys.readouterr().out


def test_config_from_environment(config_file, capsys, monkeypatch):
    monkeypatch.setenv("MTA_CONFIG", config_file)
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == f"OK: {config_file}\n"


# -- user del / list / passwd / unlock -------------------------------------------


def test_user_del_keeps_the_mail_and_warns_about_aliases(run, db, datadir):
    run("user", "add", "bob@example.test")
    run("alias", "add", "sales@example.test", "bob@example.test")
    status, out, err = run("user", "del", "Bob@example.test")
    assert status == 0 and "deleted bob@example.test" in out
    assert "sales@example.test" in err and "warning" in err
    assert db.get_user("bob@example.test") is None
    assert (datadir / "mail" / "example.test" / "bob").is_dir()
    assert db.audit_entries()[-1].action == "user.del"


def test_user_del_unknown(run, db):
    status, _, err = run("user", "del", "nobody@example.test")
    assert status == 1
    assert_one_line_error(err, "no such user: nobody@example.test")


def test_user_del_refuses_the_configured_postmaster(run, db):
    run("user", "add", "alice@example.test")
    status, _, err = run("user", "del", "alice@example.test")
    assert status == 1
    assert_one_line_error(err, "postmaster")
    assert db.get_user("alice@example.test") is not None


def test_user_list_table(run, db):
    run("user", "add", "bob@example.test", "--password-stdin", stdin="x\n")
    run("user", "add", "carol@other.test")
    db.set_quota("carol@other.test", 100)
    status, out, _ = run("user", "list")
    assert status == 0
    header, bob, carol = out.splitlines()
    assert header.split()[:3] == ["EMAIL", "ENABLED", "LOGIN"]
    assert bob.split()[:3] == ["bob@example.test", "yes", "password"] and "never" in bob
    assert carol.split()[:3] == ["carol@other.test", "yes", "none"] and "0/100 MB" in carol


def test_user_passwd_from_stdin(run, db):
    run("user", "add", "bob@example.test")
    status, out, _ = run("user", "passwd", "bob@example.test", "--password-stdin", stdin="new\n")
    assert status == 0 and "password set" in out
    assert argon2.PasswordHasher().verify(db.get_user("bob@example.test").password_hash, "new")
    assert db.audit_entries()[-1].action == "user.passwd"


def test_user_passwd_needs_a_password_source(run, db):
    run("user", "add", "bob@example.test")
    status, _, err = run("user", "passwd", "bob@example.test")
    assert status == 1
    assert_one_line_error(err, "--password-stdin")


def test_user_passwd_rejects_empty_stdin(run, db):
    run("user", "add", "bob@example.test")
    status, _, err = run("user", "passwd", "bob@example.test", "--password-stdin", stdin="\n")
    assert status == 1
    assert_one_line_error(err, "no password")


def test_user_passwd_unknown_user_reads_no_password(run, db):
    sys.stdin = io.StringIO("secret\n")
    status, _, err = run("user", "passwd", "nobody@example.test", "--password-stdin")
    assert status == 1
    assert_one_line_error(err, "no such user")
    assert sys.stdin.read() == "secret\n"


def test_user_unlock_clears_lockouts(run, db):
    run("user", "add", "bob@example.test")
    with db.transaction() as conn:
        conn.execute("INSERT INTO auth_failures VALUES ('bob@example.test|192.0.2.1', 5, 0, 9e9)")
    status, out, _ = run("user", "unlock", "bob@example.test")
    assert status == 0 and "1 lockout record cleared" in out
    with db.transaction() as conn:
        assert conn.execute("SELECT count(*) FROM auth_failures").fetchone()[0] == 0
    entry = db.audit_entries()[-1]
    assert (entry.action, entry.details["cleared"]) == ("user.unlock", 1)
    assert run("user", "unlock", "nobody@example.test")[0] == 1


# -- alias -----------------------------------------------------------------------


def test_alias_add_list_del(run, db):
    run("user", "add", "bob@example.test")
    status, out, err = run(
        "alias", "add", "Sales@example.test", "bob@example.test", "Carol@Remote.test"
    )
    assert (status, err) == (0, "")
    assert out == "added sales@example.test -> bob@example.test, Carol@remote.test\n"
    status, out, _ = run("alias", "list")
    assert out.splitlines()[1].split(None, 1) == [
        "sales@example.test",
        "bob@example.test, Carol@remote.test",
    ]
    assert run("alias", "del", "sales@example.test", "carol@remote.test")[0] == 0
    assert db.alias_targets("sales@example.test") == ("bob@example.test",)
    assert run("alias", "del", "sales@example.test")[0] == 0
    assert db.list_aliases() == {}
    actions = [(e.action, e.details.get("targets")) for e in db.audit_entries()[1:]]
    assert actions == [
        ("alias.add", ["bob@example.test", "Carol@remote.test"]),
        ("alias.del", ["Carol@remote.test"]),
        ("alias.del", ["bob@example.test"]),
    ]


def test_alias_to_an_unknown_local_address_warns(run, db):
    status, _, err = run("alias", "add", "team@example.test", "ghost@example.test", "x@remote.test")
    assert status == 0
    assert "ghost@example.test is neither" in err and "x@remote.test" not in err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["alias", "add", "sales@elsewhere.test", "bob@example.test"], "not a local domain"),
        (["alias", "add", "postmaster@example.test", "bob@example.test"], "postmaster"),
        (["alias", "add", "sales@example.test", "not an address"], "not a valid target"),
        (["alias", "del", "nothing@example.test"], "no such alias"),
    ],
)
def test_alias_errors(run, db, argv, fragment):
    status, _, err = run(*argv)
    assert status == 1
    assert_one_line_error(err, fragment)


def test_alias_duplicate(run, db):
    run("alias", "add", "sales@example.test", "bob@example.test")
    status, _, err = run("alias", "add", "sales@example.test", "bob@example.test")
    assert status == 1
    assert_one_line_error(err, "already exists")


def test_alias_add_needs_a_target(run):
    assert run("alias", "add", "sales@example.test")[0] == 2


# -- check-config ----------------------------------------------------------------


def test_check_config_ok(run, config_file):
    assert run("check-config") == (0, f"OK: {config_file}\n", "")
    assert run("check-config", config_file) == (0, f"OK: {config_file}\n", "")


def test_check_config_names_file_and_key(run, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmax_recipients = "many"\n')
    status, out, err = run("check-config", str(bad))
    assert (status, out) == (1, "")
    assert_one_line_error(err, str(bad), "limits.max_recipients")


def test_check_config_missing_file(run, tmp_path):
    status, _, err = run("check-config", str(tmp_path / "nope.toml"))
    assert status == 1
    assert_one_line_error(err, "nope.toml", "cannot read")


def test_check_config_on_embedded_defaults(config_file, capsys):
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == "OK: <defaults>\n"


def test_bad_config_fails_other_commands_cleanly(tmp_path, capsys, config_file):
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1\n")
    assert cli.main(["--config", str(bad), "user", "list"]) == 1
    assert_one_line_error(capsys.readouterr().err, "colour", "unknown key")


# -- audit -----------------------------------------------------------------------


def test_audit_filters(run, db):
    run("user", "add", "bob@example.test")
    run("user", "add", "carol@example.test")
    with db.transaction() as conn:  # age bob's entry by two hours
        conn.execute(
            "UPDATE audit_log SET timestamp = timestamp - 7200 WHERE username = 'bob@example.test'"
        )
    status, out, _ = run("audit")
    assert status == 0 and len(out.splitlines()) == 3
    _, out, _ = run("audit", "--user", "bob@example.test")
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["bob@example.test"]
    _, out, _ = run("audit", "--since", "3600")
    assert "carol@example.test" in out and "bob@example.test" not in out
    _, out, _ = run("audit", "--since", "3h")
    assert "bob@example.test" in out
    assert run("audit", "--since", "yesterday")[0] == 2


def test_parse_since():
    assert cli.parse_since("3600", now=10_000.0) == 6400.0
    assert cli.parse_since("2h", now=10_000.0) == 2800.0
    assert cli.parse_since("2024-05-01T12:00:00+00:00") == 1714564800.0
    assert cli.parse_since("2024-05-01") > 0


# -- queue list ------------------------------------------------------------------


def test_queue_list(run):
    pytest.importorskip("mta.queue.inspect")
    status, out, err = run("queue", "list")
    assert status == 0 and out and err == ""


def test_queue_list_without_the_queue_module(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "mta.queue.inspect", None)
    status, _, err = run("queue", "list")
    assert status == 1
    assert_one_line_error(err, "not available")


# -- the real entry point --------------------------------------------------------


def test_python_m_mta_admin(config_file, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(mta.__file__)))
    env = {**os.environ, "PYTHONPATH": root, "MTA_CONFIG": config_file}

    def admin(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mta.admin", *argv],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    added = admin("user", "add", "bob@example.test", "--password-stdin", stdin="s3cret\n")
    assert (added.returncode, added.stderr) == (0, "")
    listed = admin("user", "list")
    assert listed.returncode == 0 and "bob@example.test" in listed.stdout
    failed = admin("user", "add", "bob@example.test")
    assert failed.returncode == 1
    assert_one_line_error(failed.stderr, "already exists")
