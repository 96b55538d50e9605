"""The `audit_log` table: who changed what, every AUTH outcome, every console login."""

from __future__ import annotations

import json
from typing import Any

import attrs

from mta.db.addresses import lookup_key
from mta.db.connection import Connection


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


class AuditTable(Connection):
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
                    bool(success),
                    json.dumps(details or {}, sort_keys=True),
                ),
            )

    def audit_entries(
        self,
        *,
        username: str | None = None,
        since: float | None = None,
        limit: int | None = None,
        actions: tuple[str, ...] | None = None,
    ) -> list[AuditEntry]:
        """Audit rows, oldest first; `limit` keeps the newest ones; `actions`, when
        given, keeps only those actions."""
        where: list[str] = []
        params: list[Any] = []
        if username is not None:
            where.append("username = ?")
            params.append(lookup_key(username))
        if since is not None:
            where.append("timestamp >= ?")
            params.append(since)
        if actions is not None:
            where.append(f"action IN ({', '.join('?' * len(actions))})")
            params.extend(actions)
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


def _audit(row: tuple[Any, ...]) -> AuditEntry:
    id_, timestamp, username, action, ip_address, user_agent, success, details = row
    try:
        parsed = json.loads(details) if details else {}
    except ValueError:
        parsed = {"raw": details}
    return AuditEntry(
        id_, timestamp, username, action, ip_address, user_agent, bool(success), parsed
    )
