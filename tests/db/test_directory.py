"""Tests for mta.db.directory: resolution rules, snapshot refresh, service lifecycle.

Most tests run the "thread pool" synchronously through the injected
`run_in_thread` and drive the refresh loop with `task.Clock`; one test uses a real
ThreadPool on the real reactor to cover the default path.  Every test runs on
SQLite and on PostgreSQL (`db_location`, tests/conftest.py).
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from mta.config import build_config
from mta.db import Database
from mta.db.directory import MAX_DEPTH, UserDirectory, expand
from mta.envelope import Address
from mta.interfaces import IUserDirectory

ALICE = Address("alice", "example.test")
BOB = Address("bob", "example.test")


def run_now(f, *args):
    return defer.maybeDeferred(f, *args)


def result_of(value):
    """The value of an immediate tuple or of an already-fired Deferred."""
    if isinstance(value, defer.Deferred):
        out = []
        value.addBoth(out.append)
        assert out, "Deferred has not fired"
        if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]
    return value


@pytest.fixture
def config(tmp_path):
    return build_config(
        {
            "hostname": "mx.example.test",
            "datadir": str(tmp_path),
            "local_domains": ["example.test", "other.test"],
            "postmaster": "alice@example.test",
        }
    )


@pytest.fixture
def db_path(db_location):
    return db_location


@pytest.fixture
def admin(db_path):
    """A second connection, standing for mta-admin in another process."""
    with Database(db_path) as db:
        yield db


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def directory(config, db_path, clock, admin):
    d = UserDirectory(config, db_path, clock, None, run_in_thread=run_now)
    d.startService()
    yield d
    if d.running:
        d.stopService()


def resolve(directory, text_local, domain="example.test"):
    return result_of(directory.resolve(Address(text_local, domain)))


def test_provides_the_interface(directory):
    assert verifyObject(IUserDirectory, directory)


def test_start_creates_the_postmaster_user_without_password(directory, admin):
    user = admin.get_user("alice@example.test")
    assert user is not None and user.password_hash is None
    assert [(e.action, e.username) for e in admin.audit_entries()] == [
        ("user.add", "alice@example.test")
    ]


def test_existing_postmaster_user_is_left_alone(config, db_path, clock, admin):
    admin.add_user("alice@example.test", "hash")
    d = UserDirectory(config, db_path, clock, None, run_in_thread=run_now)
    result_of(d.start())
    assert admin.get_user("alice@example.test").password_hash == "hash"
    assert admin.audit_entries() == []


@pytest.mark.parametrize(
    "address",
    [
        Address("postmaster", ""),
        Address("postmaster", "example.test"),
        Address("PostMaster", "other.test"),
    ],
)
def test_postmaster_always_goes_to_the_configured_mailbox(directory, admin, address):
    admin.set_enabled("alice@example.test", False)  # even then: RFC 5321 4.5.1
    admin.add_alias("x@example.test", ["bob@example.test"])
    assert result_of(directory.resolve(address)) == (ALICE,)


def test_postmaster_of_a_foreign_domain_is_not_ours(directory):
    assert resolve(directory, "postmaster", "remote.test") == ()


def test_user_resolves_to_itself_from_the_snapshot(directory, admin, clock):
    admin.add_user("bob@example.test")
    clock.advance(1)
    result = directory.resolve(Address("bob", "example.test"))
    assert result == (BOB,)  # a plain tuple: no thread hop on a hit


def test_local_part_matching_is_case_insensitive(directory, admin, clock):
    admin.add_user("bob@example.test")
    admin.add_alias("sales@example.test", ["BOB@example.test"])
    clock.advance(1)
    assert directory.resolve(Address("BoB", "example.test")) == (BOB,)
    assert directory.resolve(Address("SALES", "example.test")) == (BOB,)


@pytest.mark.parametrize("spelling", ["jos\u00e9", "jose\u0301", "JOSE\u0301", "Jos\u00c9"])
def test_utf8_user_is_found_by_every_spelling(directory, admin, clock, spelling):
    admin.add_user("jose\u0301@example.test")  # stored NFC
    admin.add_alias("caf\u00e9@example.test", ["JOSE\u0301@example.test"])
    jose = Address("jos\u00e9", "example.test")
    # From the database (a miss in the snapshot), then from the snapshot.
    assert result_of(directory.resolve(Address(spelling, "example.test"))) == (jose,)
    clock.advance(1)
    assert directory.resolve(Address(spelling, "example.test")) == (jose,)
    assert directory.resolve(Address("cafe\u0301", "example.test")) == (jose,)


def test_unknown_local_address_resolves_to_nothing(directory):
    assert resolve(directory, "nobody") == ()


def test_foreign_domain_resolves_to_nothing(directory):
    assert directory.resolve(Address("alice", "remote.test")) == ()


def test_disabled_user_resolves_to_nothing(directory, admin, clock):
    admin.add_user("bob@example.test", enabled=False)
    clock.advance(1)
    assert resolve(directory, "bob") == ()


def test_alias_expands_to_local_and_remote_targets(directory, admin, clock):
    admin.add_user("bob@example.test")
    admin.add_alias("sales@example.test", ["bob@example.test", "Carol@Remote.test"])
    clock.advance(1)
    assert directory.resolve(Address("sales", "example.test")) == (
        BOB,
        Address("Carol", "remote.test"),
    )


def test_alias_chains_resolve_recursively_without_duplicates(directory, admin, clock):
    admin.add_user("bob@example.test")
    admin.add_alias("a@example.test", ["b@other.test", "bob@example.test"])
    admin.add_alias("b@other.test", ["c@example.test"])
    admin.add_alias("c@example.test", ["bob@example.test", "postmaster@other.test"])
    clock.advance(1)
    assert directory.resolve(Address("a", "example.test")) == (BOB, ALICE)


def test_alias_loop_without_a_user_resolves_to_nothing(directory, admin, clock):
    admin.add_alias("x@example.test", ["y@example.test"])
    admin.add_alias("y@example.test", ["x@example.test"])
    clock.advance(1)
    assert resolve(directory, "x") == ()


def test_alias_naming_its_own_source_keeps_a_copy(directory, admin, clock):
    admin.add_user("bob@example.test")
    admin.add_alias("bob@example.test", ["bob@example.test", "dave@remote.test"])
    clock.advance(1)
    assert directory.resolve(Address("bob", "example.test")) == (
        BOB,
        Address("dave", "remote.test"),
    )


def test_alias_chain_deeper_than_the_limit_is_cut(directory, admin, clock):
    admin.add_user("bob@example.test")
    for i in range(MAX_DEPTH + 2):
        admin.add_alias(f"hop{i}@example.test", [f"hop{i + 1}@example.test"])
    admin.add_alias(f"hop{MAX_DEPTH + 2}@example.test", ["bob@example.test"])
    admin.add_alias("short@example.test", ["hop5@example.test"])
    clock.advance(1)
    assert resolve(directory, "hop0") == ()
    assert resolve(directory, "short") == (BOB,)


def test_unknown_local_alias_target_is_dropped(directory, admin, clock):
    admin.add_user("bob@example.test")
    admin.add_alias("team@example.test", ["ghost@example.test", "bob@example.test"])
    clock.advance(1)
    assert resolve(directory, "team") == (BOB,)


def test_user_added_after_start_is_found_on_a_miss(directory, admin):
    admin.add_user("bob@example.test")
    result = directory.resolve(Address("bob", "example.test"))
    assert isinstance(result, defer.Deferred)  # asked of the database, not the snapshot
    assert result_of(result) == (BOB,)


def test_alias_added_after_start_is_found_on_a_miss(directory, admin):
    admin.add_alias("new@example.test", ["x@remote.test"])
    assert resolve(directory, "new") == (Address("x", "remote.test"),)


def test_deleted_user_disappears_after_the_refresh_tick(directory, admin, clock):
    admin.add_user("bob@example.test")
    clock.advance(1)
    assert directory.resolve(Address("bob", "example.test")) == (BOB,)
    admin.delete_user("bob@example.test")
    assert directory.resolve(Address("bob", "example.test")) == (BOB,)  # snapshot, until the tick
    clock.advance(1)
    assert resolve(directory, "bob") == ()


def test_audit_and_login_writes_do_not_reload_the_snapshot(directory, admin, clock):
    before = directory._snapshot
    admin.record_audit("auth.login", "alice@example.test")
    admin.record_login("alice@example.test")
    clock.advance(1)
    assert directory._snapshot is before
    admin.add_user("bob@example.test")
    clock.advance(1)
    assert directory._snapshot is not before


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_refresh_failure_is_logged_and_the_loop_goes_on(directory, admin, clock, logged):
    calls = []
    real = directory._changes

    def failing(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real(*args)

    directory._changes = failing
    admin.add_user("bob@example.test")
    clock.advance(1)
    clock.advance(1)
    assert len(calls) == 2
    assert directory.resolve(Address("bob", "example.test")) == (BOB,)
    failures = [e for e in logged if "log_failure" in e]
    assert [e["log_failure"].getErrorMessage() for e in failures] == ["disk on fire"]


def test_stop_service_stops_the_loop_and_closes_the_database(directory, clock):
    assert clock.getDelayedCalls()
    result_of(directory.stopService())
    assert clock.getDelayedCalls() == []
    assert directory._db is None


def test_resolve_before_start_is_refused(config, db_path, clock):
    d = UserDirectory(config, db_path, clock, None, run_in_thread=run_now)
    with pytest.raises(RuntimeError):
        result_of(d.resolve(ALICE))


def test_resolve_while_starting_waits_for_the_snapshot(config, db_path, clock):
    pending = []

    def run_later(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    directory = UserDirectory(config, db_path, clock, None, run_in_thread=run_later)
    started = directory.start()
    result = directory.resolve(Address("postmaster", ""))
    assert not result.called
    d, f, args = pending.pop(0)
    d.callback(f(*args))
    assert result_of(started) is None
    assert result_of(result) == (ALICE,)
    directory._db.close()


def test_start_failure_fails_waiters_and_can_be_retried(config, tmp_path, clock):
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad_path = str(blocker / "mta.db")  # parent is a file: cannot be created
    directory = UserDirectory(config, bad_path, clock, None, run_in_thread=run_now)
    with pytest.raises(OSError):
        result_of(directory.start())
    with pytest.raises(OSError):
        result_of(directory.start())


def test_expand_is_usable_on_its_own():
    users = {"bob@example.test"}
    aliases = {"a@example.test": ("bob@example.test",)}
    result = expand(
        Address("A", "example.test"),
        is_user=users.__contains__,
        targets_of=lambda key: aliases.get(key, ()),
        local_domains={"example.test"},
        postmaster=ALICE,
    )
    assert result == (BOB,)


@pytest_twisted.ensureDeferred
async def test_real_thread_pool_on_the_real_reactor(config, db_path, admin):
    from twisted.internet import reactor

    pool = ThreadPool(minthreads=1, maxthreads=2, name="directory-test")
    pool.start()
    directory = UserDirectory(config, db_path, reactor, pool)
    try:
        directory.startService()
        await directory.start()
        assert directory.resolve(Address("postmaster", "")) == (ALICE,)
        admin.add_user("bob@example.test")
        assert await directory.resolve(Address("bob", "example.test")) == (BOB,)
        assert await directory.resolve(Address("nobody", "example.test")) == ()
        await directory.stopService()
    finally:
        pool.stop()


def test_stop_waits_for_the_refresh_in_flight(config, db_path, clock):
    pending = []

    def run_held(f, *args):
        if f.__name__ == "_changes":
            d = defer.Deferred()
            pending.append((d, f, args))
            return d
        return defer.maybeDeferred(f, *args)

    directory = UserDirectory(config, db_path, clock, None, run_in_thread=run_held)
    directory.startService()
    clock.advance(1)
    [(d, f, args)] = pending
    stopped = directory.stopService()
    assert not stopped.called and directory._db is not None
    d.callback(f(*args))
    assert result_of(stopped) is None
    assert directory._db is None and clock.getDelayedCalls() == []


def test_stop_during_start_closes_the_database_once_loaded(config, db_path, clock):
    pending = []

    def run_held(f, *args):
        if f.__name__ == "_open":
            d = defer.Deferred()
            pending.append((d, f, args))
            return d
        return defer.maybeDeferred(f, *args)

    directory = UserDirectory(config, db_path, clock, None, run_in_thread=run_held)
    directory.startService()
    result_of(directory.stopService())
    [(d, f, args)] = pending
    d.callback(f(*args))
    assert directory._db is None and clock.getDelayedCalls() == []
