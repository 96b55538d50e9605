"""The `aliases` table (virtual aliases, like Postfix's virtual_alias_maps) and the
consistent snapshot of users and aliases that recipient resolution reads."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import attrs

from mta.db.addresses import address_key, alias_source, alias_target, fold, lookup_key
from mta.db.connection import Connection
from mta.db.errors import AliasExists, InvalidAddress, NoSuchAlias
from mta.db.users import MIB


@attrs.frozen
class Snapshot:
    """Everything recipient resolution needs, read in one transaction."""

    generation: int
    users: frozenset[str]  # enabled users only
    aliases: dict[str, tuple[str, ...]]
    quotas: dict[str, int] = attrs.Factory(dict)  # enabled users with a quota: bytes


class AliasTable(Connection):
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
                cursor = conn.execute(
                    "INSERT INTO aliases (source, target, created_at) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (key, target, now),
                )
                if cursor.rowcount != 1:
                    raise AliasExists(f"alias {key} -> {target} already exists")
        return stored

    def delete_alias(self, source: str, targets: Iterable[str] = ()) -> list[str]:
        """Remove the given targets of `source` (all of them when none are given);
        returns the targets removed.  Naming a pair that does not exist is an error
        and removes nothing."""
        key = lookup_key(source)
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
                match = [t for t in existing if t == target or fold(t) == fold(target)]
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
                "SELECT target FROM aliases WHERE source = ? ORDER BY rowid", (lookup_key(source),)
            ).fetchall()
        return tuple(row[0] for row in rows)

    def directory_generation(self) -> int:
        """Changes whenever a user or alias is added, removed, enabled or disabled."""
        with self._read() as conn:
            return conn.execute("SELECT generation FROM directory_generation").fetchone()[0]

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
            quotas = {
                key: quota_mb * MIB
                for key, quota_mb in conn.execute(
                    "SELECT username, quota_mb FROM users WHERE enabled AND quota_mb > 0"
                )
            }
        return Snapshot(generation, users, {k: tuple(v) for k, v in aliases.items()}, quotas)
