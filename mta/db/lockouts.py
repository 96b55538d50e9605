"""The `auth_failures` table: AUTH failure counts and lockouts, per account and per IP.

`mta.policy.lockout` decides (counting, locking, expiry); this module only stores.
Keys: an account is its lower-cased username, possibly followed by `|qualifier`; a
client address is `ip:<address>` (a username always contains "@", so the two never
meet).  `mta-admin lockout list|clear` and `user unlock` read and delete them here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import attrs

from mta.db.addresses import lookup_key
from mta.db.connection import Connection

IP_PREFIX = "ip:"  # as `mta.policy.lockout.ip_key` writes it


def same_client(a: str, b: str) -> bool:
    """Whether two spellings name one client address (`2001:DB8::0:1` and
    `2001:db8::1`; `::ffff:192.0.2.1` and `192.0.2.1`, as a dual-stack socket may
    report an IPv4 peer)."""
    return _client(a) == _client(b)


def _client(text: str) -> object:
    text = text.strip().lower()
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@attrs.frozen
class AuthFailure:
    """One row of `auth_failures`: AUTH failures of one key (account or client IP)."""

    key: str
    failures: int
    first_failure: float
    locked_until: float | None

    @property
    def kind(self) -> str:
        """ "ip" or "account"."""
        return "ip" if self.key.startswith(IP_PREFIX) else "account"

    @property
    def subject(self) -> str:
        """The account or the client address, without the `ip:` prefix."""
        return self.key[len(IP_PREFIX) :] if self.kind == "ip" else self.key

    def locked_at(self, now: float) -> bool:
        return self.locked_until is not None and now < self.locked_until


def delete_account_failures(conn: Any, key: str) -> int:
    """Delete the records of account `key` and its `key|...` qualifiers; how many."""
    cursor = conn.execute(
        "DELETE FROM auth_failures WHERE key = ? OR substr(key, 1, ?) = ?",
        (key, len(key) + 1, key + "|"),
    )
    return cursor.rowcount


class LockoutTable(Connection):
    def clear_auth_failures(self, email: str) -> int:
        """Forget the AUTH failures and lockouts of a user; returns how many keys."""
        with self.transaction() as conn:
            return delete_account_failures(conn, lookup_key(email))

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

    def list_auth_failures(self, *, locked_at: float | None = None) -> list[AuthFailure]:
        """Every record, sorted by key; only those locked at `locked_at` when given."""
        sql = "SELECT key, failures, first_failure, locked_until FROM auth_failures"
        params: tuple[float, ...] = ()
        if locked_at is not None:
            sql += " WHERE locked_until > ?"
            params = (locked_at,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY key", params).fetchall()
        return [AuthFailure(*row) for row in rows]

    def clear_client_failures(self, client: str) -> int:
        """Forget the AUTH failures and lockout of one client address, however the
        address is spelled (see `same_client`); returns how many keys."""
        with self.transaction() as conn:
            keys = [
                key
                for (key,) in conn.execute(
                    "SELECT key FROM auth_failures WHERE substr(key, 1, ?) = ?",
                    (len(IP_PREFIX), IP_PREFIX),
                )
                if same_client(key[len(IP_PREFIX) :], client)
            ]
            conn.executemany("DELETE FROM auth_failures WHERE key = ?", [(k,) for k in keys])
        return len(keys)

    def put_auth_failure(self, record: AuthFailure) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO auth_failures (key, failures, first_failure, locked_until)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET failures = excluded.failures,"
                " first_failure = excluded.first_failure, locked_until = excluded.locked_until",
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
