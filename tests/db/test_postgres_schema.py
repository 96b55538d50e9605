"""PostgreSQL migrations (mta.db.pgschema) and `mta-admin db migrate|status`, on a
fresh database per test; `[database] migrate = "manual"` on both engines."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import psycopg
import pytest

from mta.admin import cli, common
from mta.db import Database, Migration, SchemaError
from mta.db.connection import open_engine
from mta.db.pgschema import FOLDER, applied_versions, load_pg_migrations, migrate
from mta.db.schema import load_migrations


def tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    return {row[0] for row in rows}


def test_shipped_files_follow_sqlite_numbering():
    pg = {m.version: m.name for m in load_pg_migrations()}
    sqlite = {m.version: m.name for m in load_migrations()}
    # 1-99 make the same change on both engines under the same name; 100-199 are the
    # queue's (PostgreSQL only).
    assert {v: n for v, n in pg.items() if v < 100} == sqlite


def test_a_fresh_database_gets_every_table_and_the_record(postgres_dsn):
    with Database(postgres_dsn) as db:
        assert db.dialect == "postgresql"
        assert db.schema_version == load_pg_migrations()[-1].version
    assert {"users", "aliases", "audit_log", "auth_failures", "messages"} <= tables(postgres_dsn)
    engine = open_engine(postgres_dsn)
    try:
        recorded = applied_versions(engine)
    finally:
        engine.close()
    assert recorded == {m.version: m.name for m in load_pg_migrations()}


def test_migrations_apply_in_numeric_order_once_and_fill_gaps(postgres_dsn):
    first = Migration(1, "001_a.sql", "CREATE TABLE a (x int);")
    queue = Migration(100, "100_q.sql", "CREATE TABLE q (x int); INSERT INTO q VALUES (1);")
    late = Migration(2, "002_b.sql", "CREATE TABLE b (x int);")
    engine = open_engine(postgres_dsn)
    try:
        assert [m.name for m in migrate(engine, [first, queue])] == ["001_a.sql", "100_q.sql"]
        assert migrate(engine, [first, queue]) == []  # nothing re-run
        # A feature merged later (002) is applied although 100 already is.
        assert migrate(engine, [first, late, queue]) == [late]
        assert sorted(applied_versions(engine)) == [1, 2, 100]
        with engine.read() as conn:
            assert conn.execute("SELECT count(*) FROM q").fetchone() == (1,)
    finally:
        engine.close()


def test_a_failed_migration_leaves_nothing(postgres_dsn):
    good = Migration(1, "001_a.sql", "CREATE TABLE a (x int);")
    bad = Migration(2, "002_b.sql", "CREATE TABLE b (x int);\nTHIS IS NOT SQL;")
    engine = open_engine(postgres_dsn)
    try:
        with pytest.raises(SchemaError, match="002_b.sql failed"):
            migrate(engine, [good, bad])
        assert applied_versions(engine) == {1: "001_a.sql"}
    finally:
        engine.close()
    assert "b" not in tables(postgres_dsn)


def test_a_database_migrated_by_a_newer_mta_is_refused(postgres_dsn):
    with Database(postgres_dsn):
        pass
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (150, '150_from_the_future.sql', 0)")
    with pytest.raises(SchemaError, match="150_from_the_future.sql.*upgrade mta"):
        Database(postgres_dsn)


def test_the_runner_finds_every_numbered_file_of_the_folder(tmp_path, monkeypatch):
    """Another feature's file (100_queue.sql) is picked up by its name alone."""
    package = tmp_path / "pkg"
    folder = package / FOLDER
    folder.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in ("002_b.sql", "100_queue.sql", "001_a.sql", "README", "10_x.txt"):
        (folder / name).write_text("SELECT 1;")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = load_pg_migrations("pkg")
    assert [m.name for m in found] == ["001_a.sql", "002_b.sql", "100_queue.sql"]
    (folder / "100_other.sql").write_text("SELECT 1;")
    with pytest.raises(SchemaError, match="share number 100"):
        load_pg_migrations("pkg")


# -- mta-admin db ---------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path, postgres_dsn, monkeypatch):
    path = tmp_path / "mta.toml"
    path.write_text(f'datadir = "data"\n[database]\ndsn = "{postgres_dsn}"\nmigrate = "manual"\n')
    monkeypatch.delenv("MTA_CONFIG", raising=False)
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    return str(path)


def admin(config_file, *argv):
    return subprocess.run(
        [sys.executable, "-m", "mta.admin", "--config", config_file, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manual_mode_refuses_until_db_migrate_ran(config_file, capsys):
    assert cli.main(["--config", config_file, "user", "list"]) == 1
    err = capsys.readouterr().err
    assert "schema is behind" in err and "mta-admin db migrate" in err
    assert cli.main(["--config", config_file, "db", "status"]) == 0
    out = capsys.readouterr().out
    assert "(postgresql)" in out and re.search(r"001_initial.sql +pending", out)

    assert cli.main(["--config", config_file, "db", "migrate", "--dry-run"]) == 0
    assert "would apply 001_initial.sql" in capsys.readouterr().out
    assert cli.main(["--config", config_file, "db", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "applied 001_initial.sql" in out and "applied 003_messages.sql" in out
    assert cli.main(["--config", config_file, "db", "migrate"]) == 0
    assert "schema up to date" in capsys.readouterr().out
    assert cli.main(["--config", config_file, "user", "add", "--no-password", "a@localhost"]) == 0


def test_two_concurrent_db_migrate_runs_apply_each_file_once(config_file, postgres_dsn):
    """Two nodes starting together: one migrates under the advisory lock, the other
    waits and finds nothing left (a real second process each)."""
    start = threading.Barrier(2)
    results = []

    def run():
        start.wait()
        results.append(admin(config_file, "db", "migrate"))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    applied = [line for r in results for line in r.stdout.splitlines() if "applied" in line]
    names = sorted(line.split()[-1] for line in applied)
    assert names == sorted(m.name for m in load_pg_migrations())  # each exactly once
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (
            len(load_pg_migrations()),
        )


def test_sqlite_manual_mode_and_db_migrate(tmp_path, capsys, monkeypatch):
    path = tmp_path / "mta.toml"
    path.write_text('datadir = "data"\n[database]\nmigrate = "manual"\n')
    monkeypatch.setattr(common, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert cli.main(["--config", str(path), "alias", "list"]) == 1
    assert "run `mta-admin db migrate`" in capsys.readouterr().err
    assert cli.main(["--config", str(path), "db", "migrate"]) == 0
    assert "applied 002_submission_auth.sql" in capsys.readouterr().out
    assert cli.main(["--config", str(path), "alias", "list"]) == 0
    assert cli.main(["--config", str(path), "db", "status"]) == 0
    assert "sqlite" in capsys.readouterr().out


def test_twistd_refuses_to_start_on_a_schema_behind(config_file):
    from twisted.python import usage

    from mta.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match=r"\[database\].*schema is behind"):
        options.parseOptions(["--config", config_file])
    assert admin(config_file, "db", "migrate").returncode == 0
    options.parseOptions(["--config", config_file])  # now it may start


def test_a_version_3_database_keeps_its_usage_when_migrated(postgres_dsn):
    migrations = load_pg_migrations()
    with Database(postgres_dsn, migrations=[m for m in migrations if m.version <= 3]) as old:
        with old.transaction() as conn:
            conn.execute(
                "INSERT INTO users (username, email, created_at, used_mb)"
                " VALUES ('bob@example.test', 'bob@example.test', 0, 3000)"
            )
    with Database(postgres_dsn) as db:
        user = db.require_user("bob@example.test")
    assert (user.used_bytes, user.used_mb) == (3000 * 1048576, 3000)  # over 2**31: BIGINT
