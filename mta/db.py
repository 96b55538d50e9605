"""The user/alias database: one SQLite file, `<datadir>/mta.db`, and its schema.

This module owns the schema (versioned SQL files in `mta/schema/`, the version kept
in `PRAGMA user_version`) and a small *blocking* API over it.  Two kinds of callers
share the file: `mta-admin` (a separate short-lived process) and the running daemon,
which calls in only from a thread pool (`mta.directory`), never on the reactor.  WAL
mode lets the daemon keep reading while the CLI writes.

Addresses are validated here rather than in the CLI so that every writer stores the
same canonical form: lower-case, and for mailbox users a local part that is safe as
a directory name (the Maildir path is built from it).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

import attrs

from mta.envelope import Address, AddressError, parse_mailbox

# Lower-case only, and nothing a path could misread: no '/', no leading '.', no '..'.
_SAFE_LOCAL = re.compile(r"[a-z0-9_+-][a-z0-9._+-]*\Z")
_MIGRATION_NAME = re.compile(r"(\d+)_[A-Za-z0-9_.-]*\.sql\Z")


class DirectoryError(Exception):
    """A mistake an operator can make (unknown user, duplicate, bad address).

    str() is a one-line message fit to print as is; the CLI never shows a traceback
    for these.
    """


class InvalidAddress(DirectoryError):
    pass


class UserExists(DirectoryError):
    pass


class NoSuchUser(DirectoryError):
    pass


class AliasExists(DirectoryError):
    pass


class NoSuchAlias(DirectoryError):
    pass


class SchemaError(Exception):
    """The database file cannot be used by this version of mta."""


@attrs.frozen
class User:
    username: str
    email: str
    password_hash: str | None
    created_at: float
    last_login: float | None
    quota_mb: int | None
    used_mb: int
    enabled: bool

    @property
    def can_login(self) -> bool:
        return self.enabled and self.password_hash is not None


@attrs.frozen
class AuditEntry:
    id: int
    timestamp: float
    username: str | None
    action: str
    ip_address: str | None
    user_agent: str | None
    success: bool
    details: dict[str, Any]


@attrs.frozen
class AuthFailure:
    """One row of `auth_failures`: AUTH failures of one key (account or client IP)."""

    key: str
    failures: int
    first_failure: float
    locked_until: float | None


@attrs.frozen
class Migration:
    version: int
    name: str
    sql: str


@attrs.frozen
class Snapshot:
    """Everything recipient resolution needs, read in one transaction."""

    generation: int
    users: frozenset[str]  # enabled users only
    aliases: dict[str, tuple[str, ...]]


def mailbox_address(email: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate and canonicalise the address of a mailbox user.

    Raises `InvalidAddress` with a message saying what is wrong.  The local part
    becomes a directory name under `<datadir>/mail/<domain>/`, hence the strict
    character set.
    """
    address = _parse(email, "user")
    local = address.local.lower()
    if not _SAFE_LOCAL.match(local) or ".." in local:
        raise InvalidAddress(
            f"{email}: a mailbox local part may only contain a-z 0-9 . _ + - "
            "and must not start with '.' or contain '..'"
        )
    if address.domain.startswith("["):
        raise InvalidAddress(f"{email}: a mailbox needs a domain name, not an address literal")
    _check_local_domain(email, address.domain, local_domains)
    return Address(local, address.domain)


def alias_source(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate the source of an alias: an address in a local domain, lower-cased."""
    address = _parse(text, "alias")
    local = address.local.lower()
    if local == "postmaster":
        raise InvalidAddress(
            f"{text}: postmaster@ always goes to the configured postmaster; "
            "change `postmaster` in the config instead"
        )
    _check_local_domain(text, address.domain, local_domains)
    return Address(local, address.domain)


def alias_target(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate an alias target: any mailbox; lower-cased when it is local.

    A remote local part keeps its case: only the remote host may interpret it.
    """
    address = _parse(text, "target", utf8=True)
    if local_domains is not None and address.domain in local_domains:
        return Address(address.local.lower(), address.domain)
    return address


def address_key(address: Address) -> str:
    """The string a mailbox or alias is stored and looked up under."""
    return f"{address.local.lower()}@{address.domain.lower()}"


def _parse(text: str, what: str, *, utf8: bool = False) -> Address:
    try:
        return parse_mailbox(text.strip(), utf8=utf8)
    except AddressError as e:
        raise InvalidAddress(f"{text!r} is not a valid {what} address: {e}") from None


def _check_local_domain(text: str, domain: str, local_domains: Collection[str] | None) -> None:
    if local_domains is not None and domain not in local_domains:
        known = ", ".join(local_domains) or "(none)"
        raise InvalidAddress(
            f"{text}: domain {domain!r} is not a local domain (local_domains: {known})"
        )


def load_migrations(package: str = "mta", folder: str = "schema") -> list[Migration]:
    """The numbered SQL files shipped in `mta/schema/`, in order."""
    found = []
    for entry in importlib.resources.files(package).joinpath(folder).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise SchemaError(f"schema files must be numbered 1, 2, 3...: found {migration.name}")
    return found


def split_sql(script: str) -> Iterator[str]:
    """Split a script into statements (CREATE TRIGGER bodies included).

    `executescript` would commit on its own, and a migration must run in the same
    transaction as its `user_version` bump, so statements are executed one by one.
    """
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if any(line.strip() and not line.strip().startswith("--") for line in pending.splitlines()):
        raise SchemaError(f"incomplete SQL statement: {pending.strip()[:60]!r}")


def _create_private(path: str) -> None:
    """Create the database file readable only by its owner: it holds password hashes.

    SQLite gives the -wal and -shm files the same mode.  When root (mta-admin run by
    the operator) creates it, it goes to the owner of the data directory so the
    daemon, running as its own user, can still open it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o750, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)
    match_owner(path, directory)


def match_owner(path: str, reference: str) -> None:
    """When running as root, give `path` the owner of `reference` (else nothing)."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        st = os.stat(reference)
        os.chown(path, st.st_uid, st.st_gid)


class Database:
    """A connection to `mta.db`, migrated to the current schema on open.

    Every method blocks; the object may be shared between threads (one connection,
    serialised by a lock).  `clock` supplies timestamps, so tests control them.
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] | None = None,
        timeout: float = 10.0,
    ):
        self.path = path
        self._clock = clock
        self._lock = threading.RLock()
        if path != ":memory:":
            _create_private(path)
        self._conn = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._migrate(load_migrations() if migrations is None else migrations)
        except BaseException:
            self._conn.close()
            raise

    # -- plumbing ------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; nested uses join the outermost one.

        The CLI wraps a change and its audit row in one, so neither exists alone.
        """
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    @contextlib.contextmanager
    def _consistent_read(self) -> Iterator[sqlite3.Connection]:
        """Several SELECTs that see one state of the file (a deferred transaction
        takes no write lock, so mta-admin is never blocked by it)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("ROLLBACK")

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        for migration in migrations:
            if migration.version <= self.schema_version:
                continue
            # Re-read inside the write lock: the daemon and mta-admin may race here.
            with self.transaction() as conn:
                current = conn.execute("PRAGMA user_version").fetchone()[0]
                if migration.version <= current:
                    continue
                if migration.version != current + 1:
                    raise SchemaError(
                        f"{self.path}: cannot apply {migration.name} to version {current}"
                    )
                for statement in split_sql(migration.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(migration.version)}")
        latest = migrations[-1].version if migrations else 0
        if self.schema_version > latest:
            raise SchemaError(
                f"{self.path}: schema version {self.schema_version} is newer than this "
                f"mta understands ({latest}); upgrade mta"
            )

    @property
    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    def data_version(self) -> int:
        """Changes whenever another connection commits (PRAGMA data_version)."""
        with self._read() as conn:
            return conn.execute("PRAGMA data_version").fetchone()[0]

    def directory_generation(self) -> int:
        """Changes whenever a user or alias is added, removed, enabled or disabled."""
        with self._read() as conn:
            return conn.execute("SELECT generation FROM directory_generation").fetchone()[0]

    # -- users ---------------------------------------------------------------

    def add_user(
        self,
        email: str,
        password_hash: str | None = None,
        *,
        local_domains: Collection[str] | None = None,
        quota_mb: int | None = None,
        enabled: bool = True,
    ) -> User:
        """Create a user; `local_domains`, when given, is enforced for the domain."""
        key = address_key(mailbox_address(email, local_domains))
        with self.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (username, email, password_hash, created_at, quota_mb,"
                    " used_mb, enabled) VALUES (?, ?, ?, ?, ?, 0, ?)",
                    (key, key, password_hash, self._clock(), quota_mb, int(enabled)),
                )
            except sqlite3.IntegrityError:
                raise UserExists(f"user {key} already exists") from None
            return self._get_user(conn, key)

    def ensure_user(self, email: str) -> bool:
        """Create `email` without a password unless it exists; True when created."""
        key = address_key(mailbox_address(email))
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO users (username, email, password_hash, created_at,"
                " used_mb, enabled) VALUES (?, ?, NULL, ?, 0, 1)",
                (key, key, self._clock()),
            )
            return cursor.rowcount == 1

    def get_user(self, email: str) -> User | None:
        with self._read() as conn:
            return self._get_user(conn, _lookup_key(email))

    def require_user(self, email: str) -> User:
        user = self.get_user(email)
        if user is None:
            raise NoSuchUser(f"no such user: {email}")
        return user

    def _get_user(self, conn: sqlite3.Connection, key: str) -> User | None:
        row = conn.execute(
            "SELECT username, email, password_hash, created_at, last_login, quota_mb,"
            " used_mb, enabled FROM users WHERE username = ?",
            (key,),
        ).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT username, email, password_hash, created_at, last_login, quota_mb,"
                " used_mb, enabled FROM users ORDER BY email"
            ).fetchall()
        return [_user(row) for row in rows]

    def delete_user(self, email: str) -> None:
        """Remove the user and its lockouts (aliases pointing at it stay: they may be
        meant for a user about to be re-created)."""
        key = _lookup_key(email)
        with self.transaction() as conn:
            if conn.execute("DELETE FROM users WHERE username = ?", (key,)).rowcount == 0:
                raise NoSuchUser(f"no such user: {email}")
            _delete_auth_failures(conn, key)

    def set_password(self, email: str, password_hash: str | None) -> None:
        self._update_user(email, "password_hash = ?", (password_hash,))

    def set_enabled(self, email: str, enabled: bool) -> None:
        self._update_user(email, "enabled = ?", (int(enabled),))

    def set_quota(self, email: str, quota_mb: int | None) -> None:
        self._update_user(email, "quota_mb = ?", (quota_mb,))

    def record_login(self, email: str) -> None:
        self._update_user(email, "last_login = ?", (self._clock(),))

    def _update_user(self, email: str, assignment: str, values: tuple[Any, ...]) -> None:
        with self.transaction() as conn:
            cursor = conn.execute(
                f"UPDATE users SET {assignment} WHERE username = ?", (*values, _lookup_key(email))
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no such user: {email}")

    def is_enabled_user(self, email: str) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM users WHERE username = ? AND enabled", (_lookup_key(email),)
            ).fetchone()
        return row is not None

    def clear_auth_failures(self, email: str) -> int:
        """Forget the AUTH failures and lockouts of a user; returns how many keys."""
        with self.transaction() as conn:
            return _delete_auth_failures(conn, _lookup_key(email))

    def auth_failures(self, keys: Iterable[str]) -> dict[str, AuthFailure]:
        """The stored failure records of `keys` (absent keys are left out)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, failures, first_failure, locked_until FROM auth_failures"
                f" WHERE key IN ({marks})",
                wanted,
            ).fetchall()
        return {row[0]: AuthFailure(*row) for row in rows}

    def put_auth_failure(self, record: AuthFailure) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO auth_failures (key, failures, first_failure,"
                " locked_until) VALUES (?, ?, ?, ?)",
                (record.key, record.failures, record.first_failure, record.locked_until),
            )

    def delete_auth_failure(self, key: str) -> bool:
        """Forget exactly `key` (not its `key|...` qualifiers); True when it existed."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM auth_failures WHERE key = ?", (key,)).rowcount > 0

    def purge_auth_failures(self, *, window_start: float, now: float) -> int:
        """Delete records whose failure window began before `window_start` and that
        are not locked at `now`; returns how many."""
        with self.transaction() as conn:
            return conn.execute(
                "DELETE FROM auth_failures WHERE first_failure < ?"
                " AND (locked_until IS NULL OR locked_until <= ?)",
                (window_start, now),
            ).rowcount

    def replace_password_hash(self, email: str, old_hash: str, new_hash: str) -> bool:
        """Store `new_hash` only if the stored hash is still `old_hash` (a rehash on
        login must not undo a password change made meanwhile); True when stored."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                (new_hash, _lookup_key(email), old_hash),
            )
            return cursor.rowcount == 1

    def send_as_any(self, email: str) -> bool:
        """True when `email` is an enabled user allowed any MAIL FROM address."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT send_as_any FROM users WHERE username = ? AND enabled",
                (_lookup_key(email),),
            ).fetchone()
        return bool(row and row[0])

    def set_send_as_any(self, email: str, allowed: bool) -> None:
        self._update_user(email, "send_as_any = ?", (int(allowed),))

    # -- aliases -------------------------------------------------------------

    def add_alias(
        self,
        source: str,
        targets: Iterable[str],
        *,
        local_domains: Collection[str] | None = None,
    ) -> list[str]:
        """Add `source -> target` for each target, all or none; returns the stored
        target strings.  An existing pair is an error (`AliasExists`)."""
        key = address_key(alias_source(source, local_domains))
        stored = list(dict.fromkeys(str(alias_target(t, local_domains)) for t in targets))
        if not stored:
            raise InvalidAddress("an alias needs at least one target")
        now = self._clock()
        with self.transaction() as conn:
            for target in stored:
                try:
                    conn.execute(
                        "INSERT INTO aliases (source, target, created_at) VALUES (?, ?, ?)",
                        (key, target, now),
                    )
                except sqlite3.IntegrityError:
                    raise AliasExists(f"alias {key} -> {target} already exists") from None
        return stored

    def delete_alias(self, source: str, targets: Iterable[str] = ()) -> list[str]:
        """Remove the given targets of `source` (all of them when none are given);
        returns the targets removed.  Naming a pair that does not exist is an error
        and removes nothing."""
        key = _lookup_key(source)
        wanted = list(targets)
        with self.transaction() as conn:
            existing = [
                row[0]
                for row in conn.execute(
                    "SELECT target FROM aliases WHERE source = ? ORDER BY target", (key,)
                )
            ]
            if not existing:
                raise NoSuchAlias(f"no such alias: {source}")
            removed = []
            for target in wanted or existing:
                match = [t for t in existing if t == target or t.lower() == target.lower()]
                if not match:
                    raise NoSuchAlias(f"alias {key} has no target {target}")
                removed.append(match[0])
            conn.executemany(
                "DELETE FROM aliases WHERE source = ? AND target = ?", [(key, t) for t in removed]
            )
        return removed

    def list_aliases(self) -> dict[str, tuple[str, ...]]:
        """source -> targets, sorted by source."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT source, target FROM aliases ORDER BY source, rowid"
            ).fetchall()
        out: dict[str, list[str]] = {}
        for source, target in rows:
            out.setdefault(source, []).append(target)
        return {source: tuple(targets) for source, targets in out.items()}

    def alias_targets(self, source: str) -> tuple[str, ...]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT target FROM aliases WHERE source = ? ORDER BY rowid", (_lookup_key(source),)
            ).fetchall()
        return tuple(row[0] for row in rows)

    def snapshot(self) -> Snapshot:
        """Enabled users and all aliases, consistent with each other."""
        with self._consistent_read() as conn:
            generation = conn.execute("SELECT generation FROM directory_generation").fetchone()[0]
            users = frozenset(
                row[0] for row in conn.execute("SELECT username FROM users WHERE enabled")
            )
            aliases: dict[str, list[str]] = {}
            for source, target in conn.execute("SELECT source, target FROM aliases ORDER BY rowid"):
                aliases.setdefault(source, []).append(target)
        return Snapshot(generation, users, {k: tuple(v) for k, v in aliases.items()})

    # -- audit log -----------------------------------------------------------

    def record_audit(
        self,
        action: str,
        username: str | None = None,
        *,
        success: bool = True,
        ip_address: str | None = None,
        user_agent: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO audit_log (timestamp, username, action, ip_address, user_agent,"
                " success, details) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    self._clock(),
                    username,
                    action,
                    ip_address,
                    user_agent,
                    int(success),
                    json.dumps(details or {}, sort_keys=True),
                ),
            )

    def audit_entries(
        self, *, username: str | None = None, since: float | None = None, limit: int | None = None
    ) -> list[AuditEntry]:
        """Audit rows, oldest first; `limit` keeps the newest ones."""
        where, params = [], []
        if username is not None:
            where.append("username = ?")
            params.append(_lookup_key(username))
        if since is not None:
            where.append("timestamp >= ?")
            params.append(since)
        sql = (
            "SELECT id, timestamp, username, action, ip_address, user_agent, success, details"
            " FROM audit_log"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_audit(row) for row in reversed(rows)]


def _lookup_key(email: str) -> str:
    return email.strip().lower()


def _delete_auth_failures(conn: sqlite3.Connection, key: str) -> int:
    cursor = conn.execute(
        "DELETE FROM auth_failures WHERE key = ? OR substr(key, 1, ?) = ?",
        (key, len(key) + 1, key + "|"),
    )
    return cursor.rowcount


def _user(row: tuple[Any, ...]) -> User:
    username, email, password_hash, created_at, last_login, quota_mb, used_mb, enabled = row
    return User(
        username, email, password_hash, created_at, last_login, quota_mb, used_mb, bool(enabled)
    )


def _audit(row: tuple[Any, ...]) -> AuditEntry:
    id_, timestamp, username, action, ip_address, user_agent, success, details = row
    try:
        parsed = json.loads(details) if details else {}
    except ValueError:
        parsed = {"raw": details}
    return AuditEntry(
        id_, timestamp, username, action, ip_address, user_agent, bool(success), parsed
    )


class DatabaseHandle:
    """A `Database` opened on first use, from whichever pool thread asks first.

    Components that run their queries in a thread pool take this callable instead
    of an open database, so nothing touches SQLite on the reactor thread and one
    connection serves them all.  `close()` belongs to the service tree's shutdown.
    """

    def __init__(self, path: str):
        self.path = path
        self._db: Database | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Database:
        db = self._db
        if db is None:
            with self._lock:
                if self._db is None:
                    self._db = Database(self.path)
                db = self._db
        return db

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()
