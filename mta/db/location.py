"""Where `mta.db` keeps its tables: `[database] dsn`, or the SQLite file.

A *location* is one string that every opener of the database takes (`Database`,
`DatabaseHandle`, `UserDirectory`, the SQL mail store): a `postgresql://` URI, or
the path of the SQLite file (`<datadir>/mta.db` when no dsn is configured).  Keeping
it a string lets the components stay unaware of which engine serves them.
"""

from __future__ import annotations

import urllib.parse

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)


def database_location(config) -> str:
    """The configured dsn, else the SQLite file under the data directory."""
    dsn = config.database.dsn
    return dsn if dsn else config.path("mta.db")


def auto_migrate(config) -> bool:
    """True when this process may bring the schema up to date itself
    (`[database] migrate = "auto"`, the default)."""
    return config.database.migrate == "auto"


def describe(location: str) -> str:
    """The location for messages and logs: a dsn without its password."""
    if not is_postgres(location):
        return location
    parts = urllib.parse.urlsplit(location)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    query = urllib.parse.urlencode(
        [
            (k, "***" if k == "password" else v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))
