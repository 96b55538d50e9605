"""The `users` table: mailbox users, their password hashes and account settings."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import attrs

from mta.db.addresses import address_key, lookup_key, mailbox_address
from mta.db.connection import Connection
from mta.db.errors import NoSuchUser, UserExists
from mta.db.lockouts import delete_account_failures

_COLUMNS = "username, email, password_hash, created_at, last_login, quota_mb, used_mb, enabled"


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
        self._update_user(email, "quota_mb = ?", (quota_mb,))

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
    username, email, password_hash, created_at, last_login, quota_mb, used_mb, enabled = row
    return User(
        username, email, password_hash, created_at, last_login, quota_mb, used_mb, bool(enabled)
    )
