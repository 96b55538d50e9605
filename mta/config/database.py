"""`[database]` checks beyond types and choices: a dsn that names PostgreSQL and
can be parsed, so a typo stops the start with the key's name, not a driver error
at the first AUTH."""

from __future__ import annotations

import urllib.parse

from mta.config.model import DatabaseConfig

SCHEMES = ("postgresql", "postgres")


def database_section(section: DatabaseConfig, err) -> DatabaseConfig:
    dsn = section.dsn.strip()
    if not dsn:
        return section
    try:
        parts = urllib.parse.urlsplit(dsn)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        raise err("database.dsn", f"not a valid URI: {e}") from None
    if parts.scheme not in SCHEMES or not dsn.startswith(parts.scheme + "://"):
        raise err(
            "database.dsn",
            'must be a "postgresql://user@host:port/dbname" URI'
            " (leave it out for SQLite in <datadir>/mta.db)",
        )
    if not parts.path.strip("/"):
        raise err("database.dsn", "names no database (postgresql://user@host:port/DBNAME)")
    return DatabaseConfig(dsn=dsn, migrate=section.migrate)
