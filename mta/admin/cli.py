"""`mta-admin`: manage users, aliases, lockouts and the queue of an installed mta.

A plain synchronous program (no reactor): it writes `<datadir>/mta.db` directly,
and the running daemon notices within a second (see `mta.directory`).  Every
user/alias change and its audit_log row are committed together.  Operator
mistakes (unknown user, duplicate, bad address, bad config) end with a one-line
message on stderr and exit status 1; usage errors exit 2, as argparse does.
Passwords are never taken from the command line, where `ps` and shell history
would see them: they come from a terminal prompt or from stdin.

This module holds `main`, the parser and the helpers every command shares; the
commands live with their group: `mta.admin.users` (user, alias),
`mta.admin.lockouts` (lockout), `mta.admin.queue` (queue); check-config, dkim and
audit are here.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from mta.config import Config, ConfigError, build_config, load_config
from mta.db import Database, DirectoryError, SchemaError

DEFAULT_CONFIG = "/etc/mta/mta.toml"
USER_AGENT = "mta-admin"


class CLIError(Exception):
    """Ends the command with `mta-admin: <message>` on stderr and `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: keep argparse's status
        return e.code if isinstance(e.code, int) else 0
    try:
        return args.func(args) or 0
    except CLIError as e:
        error(str(e))
        return e.exit_code
    except (DirectoryError, ConfigError, SchemaError) as e:
        error(str(e))
        return 1
    except sqlite3.Error as e:
        error(f"database error: {e}")
        return 1
    except OSError as e:
        error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        return 130


def error(message: str) -> None:
    print(f"mta-admin: {message}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"mta-admin: warning: {message}", file=sys.stderr)


# -- argument parsing ------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # --config/--datadir are accepted before or after the subcommand; SUPPRESS keeps a
    # later (sub)parser from resetting a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"config file (default: $MTA_CONFIG, else {DEFAULT_CONFIG} if it exists, else built-in defaults)",
    )
    common.add_argument(
        "--datadir", metavar="DIR", default=argparse.SUPPRESS, help="override the config's datadir"
    )
    parser = argparse.ArgumentParser(
        prog="mta-admin", description="Administer an mta installation.", parents=[common]
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(func=func)
        return sub

    # Imported here: each of them imports the helpers below.
    from mta.admin import lockouts, queue, users

    users.add_user_commands(commands, leaf)
    users.add_alias_commands(commands, leaf)
    check = leaf(commands, "check-config", cmd_check_config, "validate a config file")
    check.add_argument("path", nargs="?", metavar="PATH")

    queue.add_commands(commands, leaf)

    dkim = commands.add_parser("dkim", help="DKIM signing keys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    keygen = leaf(
        dkim, "keygen", cmd_dkim_keygen, "make a signing key and print its DNS TXT record"
    )
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="default: [dkim] selector of the config")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")

    audit = leaf(commands, "audit", cmd_audit, "show the audit log")
    audit.add_argument("--user", metavar="EMAIL")
    audit.add_argument(
        "--since",
        metavar="T",
        type=parse_since,
        help="ISO date/time (2024-05-01, 2024-05-01T12:00) or seconds ago (3600, or 90m, 2h, 7d)",
    )
    audit.add_argument("--limit", type=int, default=1000, help="newest N entries (default 1000)")

    lockouts.add_commands(commands, leaf)
    return parser


_AGO = re.compile(r"(\d+)([smhd]?)\Z")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


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


def open_database(config: Config) -> Database:
    return Database(config.path("mta.db"))


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
    except (sqlite3.Error, SchemaError, OSError):
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


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or config_path(args)
    try:
        config = load_config(path, datadir=getattr(args, "datadir", None))
    except ConfigError as e:
        error(str(e))
        return 1
    print(f"OK: {config.source}")
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from mta.admin import dkim as dkim_keys

    config = config_of(args)
    domain = args.domain.strip().lower().rstrip(".")
    selector = args.selector or config.dkim.selector
    # Validate the names as [dkim] would, so the key is found under them later.
    try:
        probe = build_config({"dkim": {"selector": selector, "domains": [domain]}})
    except ConfigError as e:
        raise CLIError(str(e).split(": ", 1)[-1]) from None
    domain, selector = probe.dkim.domains[0], probe.dkim.selector
    try:
        pem, public = dkim_keys.generate_key(args.bits)
    except ValueError as e:
        raise CLIError(str(e)) from None
    os.makedirs(config.datadir, mode=0o750, exist_ok=True)
    try:
        path = dkim_keys.write_key(config.path("dkim"), domain, selector, pem, config.datadir)
    except dkim_keys.KeyExists as e:
        raise CLIError(str(e)) from None
    print(f"; private key written to {path}")
    if domain not in config.dkim.domains or selector != config.dkim.selector:
        print(
            f'; to sign with it, set [dkim] selector = "{selector}" and add "{domain}" '
            f"to [dkim] domains once this record is published"
        )
    print(dkim_keys.txt_record(domain, selector, public))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    config = config_of(args)
    with open_database(config) as db:
        entries = db.audit_entries(username=args.user, since=args.since, limit=args.limit)
    rows = [
        (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.timestamp)),
            e.username or "-",
            e.action,
            "ok" if e.success else "FAILED",
            e.ip_address or "-",
            json.dumps(e.details, sort_keys=True) if e.details else "",
        )
        for e in entries
    ]
    print(table(("TIME", "USER", "ACTION", "RESULT", "IP", "DETAILS"), rows))
    return 0
