"""The `users` table: mailbox users, their password hashes and account settings."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import attrs

from mta.db.addresses import address_key, lookup_key, mailbox_address
from mta.db.connection import Connection
from mta.db.errors import NoSuchUser, UserExists
from mta.db.lockouts import delete_account_failures

_COLUMNS = (
    "username, email, password_hash, created_at, last_login, quota_mb, used_mb, enabled, used_bytes"
)
MIB = 1 << 20  # quota_mb and used_mb count MiB
_IN_CHUNK = 500  # keys per "IN (...)": well under every SQLite's variable limit
# used_bytes + delta, never below 0, and used_mb rounded up from it, in one statement
# (a SET expression sees the row as it was before the UPDATE).
_ADD_USAGE = (
    "UPDATE users SET"
    " used_bytes = CASE WHEN used_bytes + ? > 0 THEN used_bytes + ? ELSE 0 END,"
    " used_mb = (CASE WHEN used_bytes + ? > 0 THEN used_bytes + ? ELSE 0 END + 1048575) / 1048576"
    " WHERE username = ?"
)


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
    used_bytes: int = 0

    @property
    def can_login(self) -> bool:
        return self.enabled and self.password_hash is not None

    @property
    def quota_bytes(self) -> int | None:
        """The quota in bytes; None for no quota."""
        return quota_bytes(self.quota_mb)


def quota_bytes(quota_mb: int | None) -> int | None:
    """`quota_mb` in bytes; None (no quota) for NULL and for 0."""
    return quota_mb * MIB if quota_mb else None


class UserTable(Connection):
    """Users: created, looked up (by any spelling `lookup_key` folds), changed."""

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
            created = conn.execute(
                "INSERT INTO users (username, email, password_hash, created_at, quota_mb,"
                " used_mb, enabled) VALUES (?, ?, ?, ?, ?, 0, ?)"
                " ON CONFLICT DO NOTHING RETURNING username",
                (key, key, password_hash, self._clock(), quota_mb, bool(enabled)),
            ).fetchall()
            if not created:
                raise UserExists(f"user {key} already exists")
            return self._get_user(conn, key)

    def ensure_user(self, email: str) -> bool:
        """Create `email` without a password unless it exists; True when created."""
        key = address_key(mailbox_address(email))
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO users (username, email, password_hash, created_at,"
                " used_mb, enabled) VALUES (?, ?, NULL, ?, 0, ?) ON CONFLICT DO NOTHING",
                (key, key, self._clock(), True),
            )
            return cursor.rowcount == 1

    def get_user(self, email: str) -> User | None:
        with self._read() as conn:
            return self._get_user(conn, lookup_key(email))

    def require_user(self, email: str) -> User:
        user = self.get_user(email)
        if user is None:
            raise NoSuchUser(f"no such user: {email}")
        return user

    def _get_user(self, conn: Any, key: str) -> User | None:
        row = conn.execute(f"SELECT {_COLUMNS} FROM users WHERE username = ?", (key,)).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM users ORDER BY email").fetchall()
        return [_user(row) for row in rows]

    def delete_user(self, email: str) -> None:
        """Remove the user and its lockouts (aliases pointing at it stay: they may be
        meant for a user about to be re-created)."""
        key = lookup_key(email)
        with self.transaction() as conn:
            if conn.execute("DELETE FROM users WHERE username = ?", (key,)).rowcount == 0:
                raise NoSuchUser(f"no such user: {email}")
            delete_account_failures(conn, key)

    def set_password(self, email: str, password_hash: str | None) -> None:
        self._update_user(email, "password_hash = ?", (password_hash,))

    def set_enabled(self, email: str, enabled: bool) -> None:
        self._update_user(email, "enabled = ?", (bool(enabled),))

    def set_quota(self, email: str, quota_mb: int | None) -> None:
        """`quota_mb` MiB; None or 0 removes the quota (stored as NULL)."""
        if quota_mb is not None and quota_mb < 0:
            raise ValueError(f"a quota cannot be negative: {quota_mb}")
        self._update_user(email, "quota_mb = ?", (quota_mb or None,))

    # -- usage (mta.storage.quota keeps it; these are its only writes) -------------

    def quota_usage(self, keys: Iterable[str]) -> dict[str, tuple[int | None, int]]:
        """`address_key` -> (quota in bytes or None, used_bytes) for each of `keys`
        that is a user.  Called inside `transaction()` to decide and charge at once."""
        wanted = list(dict.fromkeys(keys))
        out: dict[str, tuple[int | None, int]] = {}
        with self._read() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT username, quota_mb, used_bytes FROM users WHERE username IN ({marks})",
                    chunk,
                )
                for key, quota_mb, used in rows:
                    out[key] = (quota_bytes(quota_mb), used)
        return out

    def add_usage(self, deltas: Mapping[str, int]) -> None:
        """Add each `address_key` -> bytes (negative to give back) to used_bytes, in
        one transaction; usage never goes below 0, and unknown keys are ignored."""
        rows = [(d, d, d, d, key) for key, d in deltas.items() if d]
        if rows:
            with self.transaction() as conn:
                conn.executemany(_ADD_USAGE, rows)

    def set_usage(self, email: str, used_bytes: int) -> None:
        """Replace the usage (a recount from the store)."""
        used = max(0, int(used_bytes))
        self._update_user(email, "used_bytes = ?, used_mb = ?", (used, (used + MIB - 1) // MIB))

    def record_login(self, email: str) -> None:
        self._update_user(email, "last_login = ?", (self._clock(),))

    def set_send_as_any(self, email: str, allowed: bool) -> None:
        self._update_user(email, "send_as_any = ?", (bool(allowed),))

    def _update_user(self, email: str, assignment: str, values: tuple[Any, ...]) -> None:
        with self.transaction() as conn:
            cursor = conn.execute(
                f"UPDATE users SET {assignment} WHERE username = ?", (*values, lookup_key(email))
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no such user: {email}")

    def is_enabled_user(self, email: str) -> bool:
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM users WHERE username = ? AND enabled", (lookup_key(email),)
            ).fetchone()
        return row is not None

    def send_as_any(self, email: str) -> bool:
        """True when `email` is an enabled user allowed any MAIL FROM address."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT send_as_any FROM users WHERE username = ? AND enabled",
                (lookup_key(email),),
            ).fetchone()
        return bool(row and row[0])

    def replace_password_hash(self, email: str, old_hash: str, new_hash: str) -> bool:
        """Store `new_hash` only if the stored hash is still `old_hash` (a rehash on
        login must not undo a password change made meanwhile); True when stored."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE users SET password_hash = ? WHERE username = ? AND password_hash = ?",
                (new_hash, lookup_key(email), old_hash),
            )
            return cursor.rowcount == 1


def _user(row: tuple[Any, ...]) -> User:
    username, email, password_hash, created_at, last_login, quota_mb, used_mb, enabled, used = row
    return User(
        username,
        email,
        password_hash,
        created_at,
        last_login,
        quota_mb,
        used_mb,
        bool(enabled),
        used,
    )
