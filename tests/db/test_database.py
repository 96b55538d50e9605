"""Tests for mta.db: schema migrations, users, aliases, lockouts and the audit log.

The `db` tests run twice, on SQLite and on a fresh PostgreSQL database
(`db_location` in tests/conftest.py); the schema tests here are SQLite's
(PostgreSQL's migrations: tests/db/test_postgres_schema.py)."""

from __future__ import annotations

import os
import sqlite3
import stat
import unicodedata

import pytest

from mta.db import (
    AliasExists,
    Database,
    InvalidAddress,
    Migration,
    NoSuchAlias,
    NoSuchUser,
    SchemaError,
    UserExists,
    address_key,
    alias_source,
    alias_target,
    fold,
    load_migrations,
    mailbox_address,
    split_sql,
)
from mta.envelope import Address

LOCAL = ("example.test", "other.test")


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "data" / "mta.db")


@pytest.fixture
def db(db_location, clock):
    with Database(db_location, clock=clock) as database:
        yield database


@pytest.fixture
def sqlite_db(db_path, clock):
    with Database(db_path, clock=clock) as database:
        yield database


# -- schema ------------------------------------------------------------------


def test_new_database_is_migrated_to_latest_in_wal_mode(sqlite_db, db_path):
    db = sqlite_db
    assert db.schema_version == load_migrations()[-1].version >= 1
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"users", "aliases", "audit_log", "auth_failures"} <= tables
    conn.close()


def test_new_database_has_large_pages_and_an_old_one_keeps_its_own(sqlite_db, db_path, tmp_path):
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    conn.close()
    old = str(tmp_path / "old.db")
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE made_by_an_earlier_release (x)")
    conn.close()
    with Database(old):
        pass
    conn = sqlite3.connect(old)
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    conn.close()


def test_database_file_is_private(sqlite_db, db_path):
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600


def test_reopening_keeps_data_and_version(db_path):
    with Database(db_path) as first:
        first.add_user("alice@example.test")
        version = first.schema_version
    with Database(db_path) as second:
        assert second.schema_version == version
        assert second.get_user("alice@example.test") is not None


def test_migrations_apply_in_order_and_only_once(db_path):
    migrations = [
        Migration(1, "001_a.sql", "CREATE TABLE a (x);\n"),
        Migration(2, "002_b.sql", "-- comment\nCREATE TABLE b (y);\nINSERT INTO b VALUES (1);\n"),
    ]
    with Database(db_path, migrations=migrations[:1]) as db:
        assert db.schema_version == 1
    with Database(db_path, migrations=migrations) as db:
        assert db.schema_version == 2
    with Database(db_path, migrations=migrations) as db:  # nothing re-run
        assert db.schema_version == 2
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT count(*) FROM b").fetchone()[0] == 1
    conn.close()


def test_failed_migration_rolls_back_entirely(db_path):
    good = Migration(1, "001_a.sql", "CREATE TABLE a (x);\n")
    bad = Migration(2, "002_b.sql", "CREATE TABLE b (y);\nTHIS IS NOT SQL;\n")
    with pytest.raises(sqlite3.OperationalError):
        Database(db_path, migrations=[good, bad])
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "a" in names and "b" not in names
    conn.close()


def test_database_from_a_newer_version_is_refused(db_path):
    with Database(db_path):
        pass
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(SchemaError, match="newer"):
        Database(db_path)


def test_split_sql_keeps_trigger_bodies_whole():
    script = (
        "CREATE TABLE t (x);\n"
        "CREATE TRIGGER tr AFTER INSERT ON t\n"
        "BEGIN UPDATE t SET x = 1; UPDATE t SET x = 2; END;\n"
        "-- trailing comment\n"
    )
    statements = list(split_sql(script))
    assert len(statements) == 2
    assert statements[1].count(";") == 3


def test_split_sql_rejects_a_truncated_statement():
    with pytest.raises(SchemaError):
        list(split_sql("CREATE TABLE t (x);\nCREATE TABLE u (\n"))


# -- users -------------------------------------------------------------------


def test_add_user_stores_lower_case_address(db, clock):
    user = db.add_user("Alice@Example.TEST", "hash", local_domains=LOCAL, quota_mb=100)
    assert user.username == user.email == "alice@example.test"
    assert user.password_hash == "hash"
    assert user.created_at == clock.now
    assert user.quota_mb == 100 and user.used_mb == 0
    assert user.enabled and user.can_login
    assert db.get_user("ALICE@example.test") == user


def test_user_without_password_cannot_log_in(db):
    assert not db.add_user("bob@example.test").can_login


def test_duplicate_user_is_an_error(db):
    db.add_user("alice@example.test")
    with pytest.raises(UserExists, match="alice@example.test"):
        db.add_user("ALICE@example.test")


@pytest.mark.parametrize(
    "email",
    [
        ".alice@example.test",
        "a..b@example.test",
        "a/b@example.test",
        "a*b@example.test",
        "alice",
        "x@[192.0.2.1]",
        "",
    ],
)
def test_unsafe_or_invalid_mailbox_is_refused(db, email):
    with pytest.raises(InvalidAddress):
        db.add_user(email)


def test_mailbox_in_a_foreign_domain_is_refused_when_domains_given(db):
    with pytest.raises(InvalidAddress, match="'elsewhere.test' is not a local domain"):
        db.add_user("alice@elsewhere.test", local_domains=LOCAL)


def test_mailbox_address_accepts_the_safe_set():
    assert mailbox_address("A.b+c_d-e@Example.test") == Address("a.b+c_d-e", "example.test")


# -- UTF-8 local parts (RFC 6531/6532, issue #11) -----------------------------

NFC = "jos\u00e9"  # é as one code point
NFD = "jose\u0301"  # e + combining acute accent


def test_fold_is_nfc_then_lower_case_and_idempotent():
    assert fold(NFD) == fold(NFC) == NFC
    assert fold("JOS\u00c9") == NFC
    assert fold("Stra\u00dfe") == "stra\u00dfe"
    for text in (NFD, "JOSE\u0301", "\u0130x", "\u1fbc"):
        assert fold(fold(text)) == fold(text)


def test_address_key_folds_the_local_part():
    assert address_key(Address(NFD, "Example.TEST")) == f"{NFC}@example.test"
    assert address_key(Address("JOS\u00c9", "example.test")) == f"{NFC}@example.test"


@pytest.mark.parametrize(
    "local",
    [
        NFC,
        NFD,
        "JOS\u00c9",
        "\u7530\u4e2d",
        "\u043f\u0440\u0438\u043c\u0435\u0440",
        "d\u00e9j\u00e0.vu+tag",
    ],
)
def test_utf8_mailbox_is_accepted_in_nfc(local):
    address = mailbox_address(f"{local}@example.test", LOCAL)
    assert address == Address(fold(local), "example.test")
    assert address.local == unicodedata.normalize("NFC", address.local)


def test_nfc_and_nfd_spellings_are_one_user(db):
    user = db.add_user(f"{NFD}@example.test", "hash", local_domains=LOCAL)
    assert user.email == f"{NFC}@example.test"
    assert db.get_user(f"{NFC}@example.test") == user
    assert db.get_user("JOSE\u0301@example.test") == user
    assert db.is_enabled_user(f"{NFD}@example.test")
    with pytest.raises(UserExists):
        db.add_user(f"{NFC}@example.test")
    assert db.snapshot().users == frozenset({f"{NFC}@example.test"})
    db.delete_user(f"{NFD}@example.test")
    assert db.list_users() == []


@pytest.mark.parametrize(
    "email",
    [
        "a\u00a0b@example.test",  # no-break space
        "a\u202eb@example.test",  # right-to-left override
        "a\u200db@example.test",  # zero-width joiner
        "a\U0001f600@example.test",  # a symbol (emoji)
        "\u0301a@example.test",  # starts with a combining mark
        "a\u0085b@example.test",  # a C1 control
        f"{NFC}@ex\u00e4mple.test",  # domains stay ASCII (A-labels)
        ("\u00e9" * 33) + "@example.test",  # 66 octets: over 64
    ],
)
def test_unsafe_utf8_mailbox_is_refused(db, email):
    with pytest.raises(InvalidAddress):
        db.add_user(email)


def test_utf8_alias_source_and_local_target_are_folded(db):
    assert alias_source(f"{NFD}@example.test", LOCAL) == Address(NFC, "example.test")
    assert alias_target("JOSE\u0301@example.test", LOCAL) == Address(NFC, "example.test")
    # A remote local part is the remote host's business: kept as written.
    assert alias_target(f"{NFD}@remote.test", LOCAL) == Address(NFD, "remote.test")
    db.add_alias(f"{NFD}@example.test", [f"{NFD}@example.test"], local_domains=LOCAL)
    assert db.list_aliases() == {f"{NFC}@example.test": (f"{NFC}@example.test",)}
    assert db.alias_targets(f"{NFC}@example.test") == (f"{NFC}@example.test",)
    assert db.delete_alias(f"{NFC}@example.test", [f"{NFD}@example.test"]) == [
        f"{NFC}@example.test"
    ]


def test_ensure_user_creates_only_once(db):
    assert db.ensure_user("postmaster@example.test") is True
    assert db.ensure_user("postmaster@example.test") is False
    assert db.get_user("postmaster@example.test").password_hash is None


def test_delete_user(db):
    db.add_user("alice@example.test")
    db.delete_user("Alice@example.test")
    assert db.get_user("alice@example.test") is None
    with pytest.raises(NoSuchUser):
        db.delete_user("alice@example.test")


def test_list_users_is_sorted(db):
    db.add_user("zed@example.test")
    db.add_user("amy@example.test")
    assert [u.email for u in db.list_users()] == ["amy@example.test", "zed@example.test"]


def test_updates_on_unknown_user_raise(db):
    with pytest.raises(NoSuchUser):
        db.set_password("nobody@example.test", None)
    with pytest.raises(NoSuchUser):
        db.set_enabled("nobody@example.test", False)
    with pytest.raises(NoSuchUser):
        db.record_login("nobody@example.test")


def test_password_enabled_and_login_updates(db, clock):
    db.add_user("alice@example.test")
    db.set_password("alice@example.test", "h2")
    db.set_enabled("alice@example.test", False)
    clock.now += 10
    db.record_login("alice@example.test")
    user = db.get_user("alice@example.test")
    assert (user.password_hash, user.enabled, user.last_login) == ("h2", False, clock.now)
    assert not db.is_enabled_user("alice@example.test")


def test_clear_auth_failures_removes_only_that_users_keys(db):
    db.add_user("a_b@example.test")
    with db.transaction() as conn:
        conn.executemany(
            "INSERT INTO auth_failures VALUES (?, 3, 0, 100)",
            [
                ("a_b@example.test",),
                ("a_b@example.test|192.0.2.1",),
                ("axb@example.test",),
                ("a_b@example.testx",),
            ],
        )
    assert db.clear_auth_failures("A_B@example.test") == 2
    with db.transaction() as conn:
        left = sorted(row[0] for row in conn.execute("SELECT key FROM auth_failures"))
    assert left == ["a_b@example.testx", "axb@example.test"]


# -- aliases -----------------------------------------------------------------


def test_alias_add_list_and_targets(db):
    stored = db.add_alias(
        "Sales@Example.test", ["bob@example.test", "Carol@Remote.TEST"], local_domains=LOCAL
    )
    assert stored == ["bob@example.test", "Carol@remote.test"]  # remote local part keeps its case
    db.add_alias("info@other.test", ["sales@example.test"])
    assert db.list_aliases() == {
        "info@other.test": ("sales@example.test",),
        "sales@example.test": ("bob@example.test", "Carol@remote.test"),
    }
    assert db.alias_targets("SALES@example.test") == ("bob@example.test", "Carol@remote.test")


def test_local_alias_target_is_lower_cased():
    assert alias_target("Bob@Example.test", LOCAL) == Address("bob", "example.test")


def test_duplicate_alias_pair_adds_nothing(db):
    db.add_alias("sales@example.test", ["bob@example.test"])
    with pytest.raises(AliasExists):
        db.add_alias("sales@example.test", ["carol@example.test", "bob@example.test"])
    assert db.alias_targets("sales@example.test") == ("bob@example.test",)


@pytest.mark.parametrize(
    "source, targets",
    [
        ("postmaster@example.test", ["bob@example.test"]),
        ("sales@elsewhere.test", ["bob@example.test"]),
        ("not an address", ["bob@example.test"]),
        ("sales@example.test", ["bad target"]),
        ("sales@example.test", []),
    ],
)
def test_invalid_alias_is_refused(db, source, targets):
    with pytest.raises(InvalidAddress):
        db.add_alias(source, targets, local_domains=LOCAL)


def test_delete_alias_targets_or_all(db):
    db.add_alias("sales@example.test", ["a@example.test", "b@example.test", "c@example.test"])
    assert db.delete_alias("sales@example.test", ["B@example.test"]) == ["b@example.test"]
    with pytest.raises(NoSuchAlias):
        db.delete_alias("sales@example.test", ["a@example.test", "zzz@example.test"])
    assert db.alias_targets("sales@example.test") == ("a@example.test", "c@example.test")
    assert db.delete_alias("sales@example.test") == ["a@example.test", "c@example.test"]
    with pytest.raises(NoSuchAlias):
        db.delete_alias("sales@example.test")


# -- change detection --------------------------------------------------------


def test_generation_moves_only_for_directory_changes(db):
    start = db.directory_generation()
    db.add_user("alice@example.test")
    after_user = db.directory_generation()
    assert after_user > start
    db.record_login("alice@example.test")
    db.set_password("alice@example.test", "x")
    db.record_audit("auth.login", "alice@example.test")
    assert db.directory_generation() == after_user
    db.set_enabled("alice@example.test", False)
    assert db.directory_generation() > after_user
    before_alias = db.directory_generation()
    db.add_alias("a@example.test", ["alice@example.test"])
    assert db.directory_generation() > before_alias


def test_data_version_sees_commits_of_other_connections(db, db_location):
    before = db.data_version()
    with Database(db_location) as other:
        other.add_user("alice@example.test")
    assert db.data_version() != before


def test_snapshot_holds_enabled_users_and_aliases(db):
    db.add_user("alice@example.test")
    db.add_user("bob@example.test", enabled=False)
    db.add_alias("a@example.test", ["alice@example.test", "x@remote.test"])
    snap = db.snapshot()
    assert snap.users == frozenset({"alice@example.test"})
    assert snap.aliases == {"a@example.test": ("alice@example.test", "x@remote.test")}
    assert snap.generation == db.directory_generation()


# -- audit log ---------------------------------------------------------------


def test_audit_entries_filter_by_user_and_time(db, clock):
    db.record_audit("user.add", "alice@example.test", details={"by": "root"})
    clock.now += 100
    db.record_audit("user.add", "bob@example.test")
    clock.now += 100
    db.record_audit(
        "auth.login", "alice@example.test", success=False, ip_address="192.0.2.1", user_agent="smtp"
    )
    entries = db.audit_entries()
    assert [e.action for e in entries] == ["user.add", "user.add", "auth.login"]
    assert entries[0].details == {"by": "root"}
    assert [e.action for e in db.audit_entries(username="ALICE@example.test")] == [
        "user.add",
        "auth.login",
    ]
    since = db.audit_entries(since=clock.now - 150)
    assert [e.username for e in since] == ["bob@example.test", "alice@example.test"]
    last = db.audit_entries(limit=1)
    assert len(last) == 1 and not last[0].success and last[0].ip_address == "192.0.2.1"


def test_change_and_audit_row_share_a_transaction(db):
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.add_user("alice@example.test")
            db.record_audit("user.add", "alice@example.test")
            raise RuntimeError("boom")
    assert db.get_user("alice@example.test") is None
    assert db.audit_entries() == []


def test_a_relaxed_handle_commits_without_fsync_and_reads_the_same(tmp_path):
    """`DatabaseHandle(durable=False)` (the quota usage counters): synchronous=NORMAL
    on its own connection only; the default connection stays FULL."""
    from mta.db import DatabaseHandle

    path = str(tmp_path / "mta.db")
    strict, relaxed = DatabaseHandle(path), DatabaseHandle(path, durable=False)
    try:
        levels = []
        for handle in (strict, relaxed):
            with handle()._read() as conn:
                levels.append(conn.execute("PRAGMA synchronous").fetchone()[0])
        assert levels == [2, 1]  # FULL, NORMAL
    finally:
        strict.close()
        relaxed.close()
