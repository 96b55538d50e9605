"""`mta-admin search` over the SQL store, through `mta.admin.cli.main` (the fixtures
`run`, `config_file` and `datadir` are in tests/admin/conftest.py)."""

from __future__ import annotations

import email.utils
import time

import attrs
import pytest

from mta.config import load_config
from mta.db import database_location
from mta.envelope import Address
from mta.storage import StoreItem, messagedb
from mta.storage.sql import SQLStore
from mta.testing import MemoryBody

SQL = '\n[storage]\nbackend = "sql"\n'


@pytest.fixture
def config_file(on_each_engine):
    """Every test here runs on SQLite and on PostgreSQL."""
    return on_each_engine


def message(subject, date, to="bob@example.test", body="see you"):
    return (
        f"From: Alice <alice@example.org>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate(date)}\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def mail(config_file):
    with open(config_file, "a") as f:
        f.write(SQL)
    now = time.time()
    store = SQLStore(database_location(load_config(config_file)))
    bob, carol = Address("bob", "example.test"), Address("carol", "example.test")
    items = [
        StoreItem(bob, "t1", b"", MemoryBody(message("Lunch plans", now - 30 * 86400))),
        StoreItem(bob, "t2", b"", MemoryBody(message("Re: Lunch plans", now - 3600))),
        StoreItem(
            carol, "t3", b"", MemoryBody(message("lunch?", now - 7200, "carol@example.test"))
        ),
        StoreItem(carol, "t4", b"", MemoryBody(message("Invoice", now - 60, body="no food"))),
    ]
    assert all(isinstance(o, str) for o in store.deliver_batch(items))
    store.close()


def lines(out):
    return out.splitlines()


def test_search_prints_newest_first(run, mail):
    status, out, err = run("search", "lunch")
    assert (status, err) == (0, "")
    header, *rows = lines(out)
    assert header.split() == ["DATE", "FROM", "SUBJECT", "MAILBOX", "ID"]
    assert [row.split()[-2:] for row in rows] == [
        ["bob@example.test", "2"],
        ["carol@example.test", "3"],
        ["bob@example.test", "1"],
    ]
    assert "Re: Lunch plans" in rows[0] and "Alice <alice@example.org>" in rows[0]


def test_search_filters(run, mail):
    status, out, _ = run("search", "lunch", "--user", "Carol@Example.Test")
    assert status == 0
    assert [row.split()[-1] for row in lines(out)[1:]] == ["3"]
    status, out, _ = run("search", "lunch", "--since", "7d")
    assert [row.split()[-1] for row in lines(out)[1:]] == ["2", "3"]
    status, out, _ = run("search", "lunch", "--limit", "1")
    assert [row.split()[-1] for row in lines(out)[1:]] == ["2"]


def test_no_match_prints_nothing(run, mail):
    assert run("search", "pizza") == (0, "", "")


@pytest.mark.parametrize("query", ['"unbalanced', "AND OR", "x* NEAR(", "a:b", "-"])
def test_hostile_query(run, mail, query):
    status, _, err = run("search", query)
    assert (status, err) == (0, "")


def test_usage_errors(run, mail):
    assert run("search", "lunch", "--limit", "0")[0] == 2
    assert run("search", "lunch", "--since", "soon")[0] == 2
    assert run("search")[0] == 2


def test_other_backends_refuse(run):
    status, out, err = run("search", "lunch")
    assert status == 1
    assert (
        err == "mta-admin: search needs [storage] backend = \"sql\" (this config uses 'maildir')\n"
    )


def test_db_reindex_checks_and_rebuilds_the_index(run, mail, config_file, monkeypatch):
    """SQLite's index keeps words, not text (mta.storage.messagedb): `db reindex
    --check` finds a message that parses into other words than it was indexed under
    (here: a patched parser, as another Python might be), `mta-admin mail delete`
    refuses it naming the command, and `db reindex` puts it right.  PostgreSQL
    keeps the words in each row: nothing to do."""
    location = database_location(load_config(config_file))
    if location.startswith("postgresql"):
        status, out, _ = run("db", "reindex")
        assert status == 0 and out.endswith("nothing to do\n")
        return
    status, out, _ = run("db", "reindex", "--check")
    assert (status, out) == (0, f"{location}: the search index matches the messages\n")
    real = messagedb.parse_message

    def changed(data, now):
        fields = real(data, now)
        return attrs.evolve(fields, text=fields.text + " extra") if b"no food" in data else fields

    monkeypatch.setattr(messagedb, "parse_message", changed)
    status, out, _ = run("db", "reindex", "--check")
    assert status == 1
    assert out == (
        f"{location}: 1 message(s) now give other words than they were indexed under"
        " (mta-admin db reindex puts it right)\n"
    )
    status, _, err = run("mail", "delete", "carol@example.test", "4")
    assert status != 0 and "run mta-admin db reindex" in err
    assert run("db", "reindex") == (0, f"{location}: search index rebuilt (4 messages)\n", "")
    assert run("db", "reindex", "--check")[0] == 0
    assert run("search", "extra")[1].split()[-2:] == ["carol@example.test", "4"]
    assert run("mail", "delete", "carol@example.test", "4")[0] == 0
    assert run("db", "reindex", "--check")[0] == 0
