"""`mta-admin`: manage users, aliases, lockouts and the queue of an installed mta.

A plain synchronous program (no reactor): it writes `<datadir>/mta.db` directly,
and the running daemon notices within a second (see `mta.db.directory`).  Every
user/alias change and its audit_log row are committed together.  Operator
mistakes (unknown user, duplicate, bad address, bad config) end with a one-line
message on stderr and exit status 1; usage errors exit 2, as argparse does.
Passwords are never taken from the command line, where `ps` and shell history
would see them: they come from a terminal prompt or from stdin.

This module holds `main` and the parser; the helpers every command shares are in
`mta.admin.common` (re-exported here), the commands live with their group:
`mta.admin.users` (user, alias), `mta.admin.lockouts` (lockout), `mta.admin.queue`
(queue); check-config, dkim and audit are here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from typing import Any

from mta.admin.common import (  # noqa: F401 (re-exported for callers of mta.admin.cli)
    DEFAULT_CONFIG,
    USER_AGENT,
    CLIError,
    audit_change,
    audit_refusal,
    config_of,
    config_path,
    error,
    open_database,
    parse_since,
    read_password,
    table,
    warn,
    when,
)
from mta.config import ConfigError, build_config, load_config
from mta.db import DirectoryError, SchemaError, database_errors


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
    except database_errors() as e:
        error(f"database error: {e}")
        return 1
    except OSError as e:
        error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        return 130


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
    from mta.admin import cluster, db, keys, lockouts, mail, queue, search, spam, users
    from mta.admin import quarantine as quarantine_commands

    users.add_user_commands(commands, leaf)
    users.add_alias_commands(commands, leaf)
    check = leaf(commands, "check-config", cmd_check_config, "validate a config file")
    check.add_argument("path", nargs="?", metavar="PATH")

    queue.add_commands(commands, leaf)
    quarantine_commands.add_commands(commands, leaf)

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
    mail.add_commands(commands, leaf)
    search.add_commands(commands, leaf)
    keys.add_commands(commands, leaf)
    db.add_commands(commands, leaf)
    spam.add_commands(commands, leaf)
    cluster.add_commands(commands, leaf)
    return parser


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
