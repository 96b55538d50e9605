"""The usage columns of `users` (schema 004) and the methods that read and write
them, on real SQLite files and (the `db` tests) on PostgreSQL too."""

from __future__ import annotations

import pytest

from mta.db import MIB, Database, NoSuchUser, load_migrations


@pytest.fixture
def db(db_location):
    with Database(db_location) as database:
        database.add_user("bob@example.test")
        database.add_user("carol@example.test", quota_mb=2)
        yield database


def test_a_version_3_database_keeps_its_usage_when_migrated(tmp_path):
    path = str(tmp_path / "old.db")
    migrations = load_migrations()
    with Database(path, migrations=migrations[:3]) as old, old.transaction() as conn:
        conn.execute(
            "INSERT INTO users (username, email, created_at, used_mb)"
            " VALUES ('bob@example.test', 'bob@example.test', 0, 7)"
        )
    with Database(path) as db:
        user = db.require_user("bob@example.test")
    assert (user.used_bytes, user.used_mb) == (7 * MIB, 7)


def test_add_usage_adds_rounds_used_mb_up_and_never_goes_below_zero(db):
    db.add_usage({"bob@example.test": 1000, "carol@example.test": MIB + 1, "nobody@x.test": 5})
    bob, carol = db.require_user("bob@example.test"), db.require_user("carol@example.test")
    assert (bob.used_bytes, bob.used_mb) == (1000, 1)
    assert (carol.used_bytes, carol.used_mb) == (MIB + 1, 2)
    db.add_usage({"bob@example.test": -5000})
    bob = db.require_user("bob@example.test")
    assert (bob.used_bytes, bob.used_mb) == (0, 0)


def test_quota_usage_reads_users_only(db):
    db.add_usage({"carol@example.test": 10})
    keys = ["carol@example.test", "bob@example.test", "nobody@example.test"]
    assert db.quota_usage(keys) == {
        "carol@example.test": (2 * MIB, 10),
        "bob@example.test": (None, 0),
    }
    many = [f"u{i}@example.test" for i in range(1200)] + ["bob@example.test"]
    assert db.quota_usage(many) == {"bob@example.test": (None, 0)}  # past the IN (...) chunk


def test_set_quota_zero_means_none_and_negative_is_refused(db):
    db.set_quota("bob@example.test", 5)
    assert db.require_user("bob@example.test").quota_bytes == 5 * MIB
    db.set_quota("bob@example.test", 0)
    assert db.require_user("bob@example.test").quota_mb is None
    with pytest.raises(ValueError, match="cannot be negative"):
        db.set_quota("bob@example.test", -1)
    with pytest.raises(NoSuchUser):
        db.set_quota("nobody@example.test", 1)


def test_set_usage_replaces_it(db):
    db.add_usage({"bob@example.test": 5 * MIB})
    db.set_usage("bob@example.test", 3 * MIB + 1)
    bob = db.require_user("bob@example.test")
    assert (bob.used_bytes, bob.used_mb) == (3 * MIB + 1, 4)


def test_a_quota_change_reloads_the_directory_snapshot_and_usage_does_not(db):
    generation = db.directory_generation()
    db.add_usage({"bob@example.test": 100})
    db.set_usage("bob@example.test", 50)
    assert db.directory_generation() == generation
    db.set_quota("bob@example.test", 3)
    assert db.directory_generation() == generation + 1
    assert db.snapshot().quotas == {"bob@example.test": 3 * MIB, "carol@example.test": 2 * MIB}
    db.set_enabled("carol@example.test", False)
    assert db.snapshot().quotas == {"bob@example.test": 3 * MIB}
