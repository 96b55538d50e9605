"""mta-admin user/alias (mta.admin.users): the mail-store seam, the shared password
hashing, and UTF-8 mailboxes (issue #11)."""

from __future__ import annotations

import os

import pytest

from mta.admin import users
from mta.config import load_config
from mta.envelope import Address
from mta.smtp.auth import Argon2idChecker
from mta.storage import UnsafeMailboxName


@pytest.fixture
def config_file(on_each_engine):
    """Every test here runs on SQLite and on PostgreSQL."""
    return on_each_engine


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("mta-admin: ")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err


class RecordingStore:
    """Stands for the configured IMailStore: records `create_mailbox` calls."""

    def __init__(self, answer=None, error=None):
        self.answer = answer
        self.error = error
        self.created = []

    def create_mailbox(self, mailbox):
        self.created.append(mailbox)
        if self.error is not None:
            raise self.error
        return self.answer


@pytest.fixture
def store(monkeypatch):
    fake = RecordingStore("/srv/mail/example.test/bob")
    opened = []

    def open_store(config):
        opened.append(config)
        return fake

    monkeypatch.setattr(users, "open_store", open_store)
    fake.opened = opened
    return fake


# -- the mail-store seam -------------------------------------------------------------


def test_user_add_creates_the_mailbox_through_the_configured_store(run, db, store, datadir):
    status, out, err = run("user", "add", "Bob@example.test")
    assert (status, err) == (0, "")
    assert store.created == [Address("bob", "example.test")]
    assert store.opened[0].datadir == str(datadir)
    assert out == (
        "added bob@example.test, mailbox /srv/mail/example.test/bob (no password: cannot log in)\n"
    )
    assert not (datadir / "mail").exists()  # the CLI made nothing itself


def test_a_store_with_nothing_to_make_prints_no_mailbox(run, db, store):
    store.answer = None
    status, out, _ = run("user", "add", "bob@example.test")
    assert status == 0
    assert out == "added bob@example.test (no password: cannot log in)\n"


def test_a_name_the_store_refuses_adds_no_user(run, db, store):
    store.error = UnsafeMailboxName("unsafe local part for a mailbox path: 'bob'")
    status, _, err = run("user", "add", "bob@example.test")
    assert status == 1
    assert_one_line_error(err, "bob@example.test", "unsafe local part")
    assert db.get_user("bob@example.test") is None
    last = db.audit_entries()[-1]
    assert (last.action, last.success) == ("user.add", False)


def test_the_real_store_makes_a_maildir(run, db, datadir):
    status, out, _ = run("user", "add", "bob@example.test")
    box = datadir / "mail" / "example.test" / "bob"
    assert status == 0 and f"mailbox {box}" in out
    assert all((box / sub).is_dir() for sub in ("tmp", "new", "cur"))


def test_hand_over_gives_what_root_made_to_the_datadir_owner(tmp_path):
    datadir = tmp_path / "data"
    box = datadir / "mail" / "example.test" / "bob"
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True)
    calls = []
    users.hand_over(str(box), str(datadir), 4242, 4343, chown=lambda *a: calls.append(a))
    expected = [box, box / "cur", box / "new", box / "tmp", box.parent, box.parent.parent]
    assert calls == [(str(p), 4242, 4343) for p in expected]


def test_hand_over_leaves_what_the_owner_already_has(tmp_path):
    box = tmp_path / "data" / "mail" / "example.test" / "bob"
    box.mkdir(parents=True)
    calls = []
    st = os.stat(box)
    users.hand_over(
        str(box), str(tmp_path / "data"), st.st_uid, st.st_gid, chown=lambda *a: calls.append(a)
    )
    assert calls == []


# -- password hashing ----------------------------------------------------------------


def test_stored_hash_is_current_for_the_auth_checker(run, db, config_file):
    run("user", "add", "bob@example.test", "--password-stdin", stdin="s3cret\n")
    run("user", "passwd", "bob@example.test", "--password-stdin", stdin="n3w\n")
    config = load_config(config_file)
    checker = Argon2idChecker.from_config(config.auth, lambda: db, None)
    stored = db.get_user("bob@example.test").password_hash
    assert checker.hasher.verify(stored, "n3w")
    assert not checker.hasher.check_needs_rehash(stored)


def test_hand_over_ignores_a_path_outside_the_datadir(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    calls = []
    users.hand_over(
        str(elsewhere), str(tmp_path / "data"), 4242, 4242, chown=lambda *a: calls.append(a)
    )
    assert calls == []


# -- UTF-8 mailboxes (issue #11) -------------------------------------------------------

NFC = "jos\u00e9"
NFD = "jose\u0301"


def test_user_add_accepts_a_utf8_local_part(run, db, datadir):
    status, out, err = run("user", "add", f"{NFC}@example.test")
    assert (status, err) == (0, "")
    box = datadir / "mail" / "example.test" / NFC
    assert out.startswith(f"added {NFC}@example.test, mailbox {box}")
    assert (box / "new").is_dir()
    assert [u.email for u in db.list_users()] == [f"{NFC}@example.test"]


def test_nfd_spelling_is_the_same_user_in_every_command(run, db, datadir):
    assert run("user", "add", f"{NFD}@example.test")[0] == 0  # stored, and made, in NFC
    assert os.listdir(datadir / "mail" / "example.test") == [NFC]
    status, _, err = run("user", "add", f"{NFC.upper()}@example.test")
    assert status == 1
    assert_one_line_error(err, f"user {NFC}@example.test already exists")
    status, out, _ = run("user", "passwd", f"{NFD}@example.test", "--password-stdin", stdin="pw\n")
    assert (status, out) == (0, f"password set for {NFC}@example.test\n")
    assert db.get_user(f"{NFC}@example.test").password_hash is not None
    status, out, err = run("alias", "add", "caf\u00e9@example.test", f"{NFD}@example.test")
    assert (status, err) == (0, "")
    assert out == f"added caf\u00e9@example.test -> {NFC}@example.test\n"
    status, out, _ = run("alias", "del", "cafe\u0301@example.test")
    assert (status, out) == (0, f"removed caf\u00e9@example.test -> {NFC}@example.test\n")
    status, out, _ = run("user", "del", f"{NFD}@example.test")
    assert (status, out) == (0, f"deleted {NFC}@example.test (its mail stays on disk)\n")
    assert db.list_users() == []


def test_utf8_that_cannot_name_a_mailbox_is_refused(run, db, datadir):
    status, _, err = run("user", "add", "a\u202eb@example.test")
    assert status == 1
    assert_one_line_error(err, "may only contain letters, digits")
    assert not (datadir / "mail").exists()
