"""What every `mta-admin` command group shares: errors, the config and database,
the audit trail, passwords from a prompt or stdin, and table output."""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from mta.config import Config, load_config
from mta.db import Database, SchemaError, auto_migrate, database_errors, database_location

DEFAULT_CONFIG = "/etc/mta/mta.toml"
USER_AGENT = "mta-admin"


class CLIError(Exception):
    """Ends the command with `mta-admin: <message>` on stderr and `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


_AGO = re.compile(r"(\d+)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def error(message: str) -> None:
    print(f"mta-admin: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"mta-admin: warning: {message}", file=sys.stderr)


def parse_since(text: str, now: float | None = None) -> float:
    """`--since` as a Unix time: seconds ago (with an optional s/m/h/d unit) or an
    ISO date/time, local time unless it carries an offset."""
    now = time.time() if now is None else now
    match = _AGO.match(text.strip())
    if match:
        return now - int(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected seconds ago (3600, 2h) or an ISO date/time (2024-05-01T12:00)"
        ) from None


# -- shared helpers --------------------------------------------------------------


def config_path(args: argparse.Namespace) -> str | None:
    """--config, else $MTA_CONFIG, else the Debian path if present, else None."""
    path = getattr(args, "config", None) or os.environ.get("MTA_CONFIG")
    if path:
        return path
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def config_of(args: argparse.Namespace) -> Config:
    return load_config(config_path(args), datadir=getattr(args, "datadir", None))


def open_database(config: Config, *, migrate: bool | None = None) -> Database:
    """The configured database; migrated when `[database] migrate` is "auto"
    (or `migrate` says so), else refused while its schema is behind."""
    return Database(
        database_location(config), migrate=auto_migrate(config) if migrate is None else migrate
    )


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): still audit the change
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def audit_change(db: Database, action: str, username: str | None, **details: Any) -> None:
    db.record_audit(action, username, user_agent=USER_AGENT, details={"by": _operator(), **details})


def audit_refusal(config: Config, action: str, username: str, error: Exception) -> None:
    """Record a refused change too: repeated attempts are worth seeing in `audit`."""
    try:
        with open_database(config) as db:
            db.record_audit(
                action,
                username,
                success=False,
                user_agent=USER_AGENT,
                details={"by": _operator(), "error": str(error)},
            )
    except (*database_errors(), SchemaError, OSError):
        pass  # the original error is the one to report


def read_password(args: argparse.Namespace, *, required: bool) -> str | None:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CLIError("no password on standard input")
        return password
    if getattr(args, "no_password", False):
        return None
    if sys.stdin is not None and sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if not password:
            raise CLIError("empty password (use --no-password for a mailbox without login)")
        if getpass.getpass("Retype password: ") != password:
            raise CLIError("passwords do not match")
        return password
    if required:
        raise CLIError("no password given: use --password-stdin, or run on a terminal")
    return None


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    return "\n".join(lines)


# -- check-config, dkim, audit ---------------------------------------------------
