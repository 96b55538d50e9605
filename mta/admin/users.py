"""`mta-admin user ...` and `mta-admin alias ...`: mailbox users and virtual aliases.

Every change and its audit_log row are committed together; a refused change is
audited too.  Addresses are validated and canonicalised by `mta.db`, so the CLI
stores exactly what the daemon looks up.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mta.admin.cli import (
    CLIError,
    audit_change,
    audit_refusal,
    config_of,
    create_maildir,
    hash_password,
    open_database,
    read_password,
    table,
    when,
)
from mta.db import DirectoryError, User, address_key, alias_source, mailbox_address


def add_user_commands(commands: Any, leaf: Any) -> None:
    """`user add|del|list|passwd|unlock|set-send-as`."""
    user = commands.add_parser("user", help="mailbox users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = leaf(user, "add", cmd_user_add, "create a user and its mailbox")
    add.add_argument("email")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    how.add_argument(
        "--no-password", action="store_true", help="mailbox only; the user cannot log in"
    )
    leaf(user, "del", cmd_user_del, "delete a user (the mailbox stays on disk)").add_argument(
        "email"
    )
    leaf(user, "list", cmd_user_list, "list users")
    passwd = leaf(user, "passwd", cmd_user_passwd, "set a user's password")
    passwd.add_argument("email")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )
    unlock = leaf(user, "unlock", cmd_user_unlock, "clear a user's AUTH lockout")
    unlock.add_argument("email")
    unlock.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="also clear the lockout of this client address (repeatable)",
    )
    send_as = leaf(
        user, "set-send-as", cmd_user_set_send_as, "which MAIL FROM addresses a user may use"
    )
    send_as.add_argument("email")
    send_as.add_argument(
        "scope",
        choices=("own", "any"),
        help="own: its address and aliases pointing at it; any: every address (service accounts)",
    )


def add_alias_commands(commands: Any, leaf: Any) -> None:
    """`alias add|del|list`."""
    alias = commands.add_parser("alias", help="virtual aliases").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = leaf(alias, "add", cmd_alias_add, "deliver mail for SOURCE to each TARGET")
    add.add_argument("source")
    add.add_argument("targets", nargs="+", metavar="TARGET")
    delete = leaf(alias, "del", cmd_alias_del, "remove the given targets, or the whole alias")
    delete.add_argument("source")
    delete.add_argument("targets", nargs="*", metavar="TARGET")
    leaf(alias, "list", cmd_alias_list, "list aliases")


# -- user ------------------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        mailbox = mailbox_address(args.email, config.local_domains)
    except DirectoryError as e:
        audit_refusal(config, "user.add", args.email, e)
        raise
    email = address_key(mailbox)
    password = read_password(args, required=False)
    password_hash = hash_password(config, password) if password is not None else None
    with open_database(config) as db:
        try:
            with db.transaction():
                db.add_user(email, password_hash, local_domains=config.local_domains)
                audit_change(db, "user.add", email, password=password_hash is not None)
                # Inside the transaction: no user row without its mailbox.
                path = create_maildir(config, mailbox)
        except DirectoryError as e:
            audit_refusal(config, "user.add", email, e)
            raise
    login = "" if password_hash else " (no password: cannot log in)"
    where = f", mailbox {path}" if path else ""
    print(f"added {email}{where}{login}")
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = args.email.strip().lower()
    if email == config.postmaster.lower():
        raise CLIError(
            f"{email} is the configured postmaster; change `postmaster` in {config.source} first"
        )
    with open_database(config) as db:
        try:
            with db.transaction():
                db.delete_user(email)
                audit_change(db, "user.del", email)
        except DirectoryError as e:
            audit_refusal(config, "user.del", email, e)
            raise
        referring = sorted(src for src, targets in db.list_aliases().items() if email in targets)
    print(f"deleted {email} (its mail stays on disk)")
    if referring:
        print(
            f"mta-admin: warning: still an alias target of {', '.join(referring)}", file=sys.stderr
        )
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    with open_database(config) as db:
        users = db.list_users()
    print(
        table(
            ("EMAIL", "ENABLED", "LOGIN", "CREATED", "LAST LOGIN", "QUOTA"),
            [_user_row(u) for u in users],
        )
    )
    return 0


def _user_row(user: User) -> tuple[str, ...]:
    quota = "-" if user.quota_mb is None else f"{user.used_mb}/{user.quota_mb} MB"
    return (
        user.email,
        "yes" if user.enabled else "no",
        "password" if user.password_hash else "none",
        when(user.created_at),
        when(user.last_login),
        quota,
    )


def cmd_user_passwd(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = args.email.strip().lower()
    with open_database(config) as db:
        db.require_user(email)  # before asking for a password nobody will use
    password_hash = hash_password(config, read_password(args, required=True))
    with open_database(config) as db:
        with db.transaction():
            db.set_password(email, password_hash)
            audit_change(db, "user.passwd", email)
    print(f"password set for {email}")
    return 0


def cmd_user_unlock(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = args.email.strip().lower()
    with open_database(config) as db:
        with db.transaction():
            db.require_user(email)
            cleared = db.clear_auth_failures(email)
            for address in args.ip:
                cleared += db.delete_auth_failure("ip:" + address.strip().lower())
            extra = {"ip": args.ip} if args.ip else {}
            audit_change(db, "user.unlock", email, cleared=cleared, **extra)
    print(f"unlocked {email} ({cleared} lockout record{'s' if cleared != 1 else ''} cleared)")
    return 0


def cmd_user_set_send_as(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = args.email.strip().lower()
    with open_database(config) as db:
        with db.transaction():
            db.set_send_as_any(email, args.scope == "any")
            audit_change(db, "user.send_as", email, scope=args.scope)
    print(f"{email} may send as {'any address' if args.scope == 'any' else 'its own addresses'}")
    return 0


# -- alias -----------------------------------------------------------------------


def cmd_alias_add(args: argparse.Namespace) -> int:
    config = config_of(args)
    with open_database(config) as db:
        try:
            source = address_key(alias_source(args.source, config.local_domains))
            with db.transaction():
                targets = db.add_alias(source, args.targets, local_domains=config.local_domains)
                audit_change(db, "alias.add", source, targets=targets)
        except DirectoryError as e:
            audit_refusal(config, "alias.add", args.source, e)
            raise
        aliases = db.list_aliases()
        dangling = [
            t
            for t in targets
            if config.is_local_domain(t.rpartition("@")[2])
            and t.partition("@")[0] != "postmaster"
            and t not in aliases
            and not db.is_enabled_user(t)
        ]
    print(f"added {source} -> {', '.join(targets)}")
    for target in dangling:
        print(
            f"mta-admin: warning: {target} is neither an enabled user nor an alias; mail for it is refused",
            file=sys.stderr,
        )
    return 0


def cmd_alias_del(args: argparse.Namespace) -> int:
    config = config_of(args)
    source = args.source.strip().lower()
    with open_database(config) as db:
        try:
            with db.transaction():
                removed = db.delete_alias(source, args.targets)
                audit_change(db, "alias.del", source, targets=removed)
        except DirectoryError as e:
            audit_refusal(config, "alias.del", source, e)
            raise
    print(f"removed {source} -> {', '.join(removed)}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    with open_database(config) as db:
        aliases = db.list_aliases()
    print(
        table(
            ("SOURCE", "TARGETS"), [(src, ", ".join(targets)) for src, targets in aliases.items()]
        )
    )
    return 0
