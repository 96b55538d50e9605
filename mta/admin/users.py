"""`mta-admin user ...` and `mta-admin alias ...`: mailbox users and virtual aliases.

Every change and its audit_log row are committed together; a refused change is
audited too.  Addresses are validated and canonicalised by `mta.db`, so the CLI
stores exactly what the daemon looks up.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from mta.admin import quota
from mta.admin.common import (
    CLIError,
    audit_change,
    audit_refusal,
    config_of,
    open_database,
    read_password,
    table,
    warn,
    when,
)
from mta.admin.lockouts import stamp, still_locked_clients
from mta.auth.passwords import PasswordHashError, hash_password
from mta.config import Config
from mta.db import (
    DirectoryError,
    InvalidAddress,
    User,
    address_key,
    alias_source,
    lookup_key,
    mailbox_address,
)
from mta.envelope import Address
from mta.storage import UnknownBackend, UnsafeMailboxName, open_store


def add_user_commands(commands: Any, leaf: Any) -> None:
    """`user add|del|list|show|passwd|unlock|set-send-as|quota`."""
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
    quota.add_commands(user, leaf)


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


# -- helpers ---------------------------------------------------------------------


def new_hash(config: Config, password: str) -> str:
    """The hash the AUTH checker verifies (`mta.auth.passwords`), or a CLIError."""
    try:
        return hash_password(config.auth, password)
    except PasswordHashError as e:
        raise CLIError(str(e)) from None


def create_mailbox(config: Config, mailbox: Address) -> str | None:
    """Make `mailbox` ready through the configured store (`IMailStore.create_mailbox`);
    where it lives, or None when the backend needs nothing made.

    What root makes goes to the data directory's owner, so the daemon, running as
    its own user, can deliver into it.
    """
    os.makedirs(config.datadir, mode=0o750, exist_ok=True)
    try:
        store = open_store(config)
    except UnknownBackend as e:
        raise CLIError(str(e)) from None
    try:
        path = store.create_mailbox(mailbox)
    except UnsafeMailboxName as e:
        raise InvalidAddress(f"{mailbox}: {e}") from None
    if path is not None and hasattr(os, "geteuid") and os.geteuid() == 0:
        st = os.stat(config.datadir)
        hand_over(path, config.datadir, st.st_uid, st.st_gid)
    return path


def hand_over(
    path: str,
    datadir: str,
    uid: int,
    gid: int,
    *,
    chown: Callable[[str, int, int], None] = os.chown,
) -> None:
    """Give `uid:gid` what this process owns of a new mailbox: `path`, the entries
    directly in it (tmp/ new/ cur/), and its parents below `datadir`.  Anything
    someone else owns, and a path outside `datadir`, is left alone."""
    me = os.geteuid()
    datadir = os.path.abspath(datadir)
    path = os.path.abspath(path)
    if not path.startswith(datadir + os.sep) or not os.path.lexists(path):
        return
    paths = [path]
    if os.path.isdir(path):
        paths += [os.path.join(path, name) for name in sorted(os.listdir(path))]
    parent = os.path.dirname(path)
    while parent.startswith(datadir + os.sep):
        paths.append(parent)
        parent = os.path.dirname(parent)
    for item in paths:
        st = os.lstat(item)
        if st.st_uid == me and (st.st_uid, st.st_gid) != (uid, gid):
            chown(item, uid, gid)


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
    password_hash = new_hash(config, password) if password is not None else None
    with open_database(config) as db:
        try:
            with db.transaction():
                db.add_user(email, password_hash, local_domains=config.local_domains)
                audit_change(db, "user.add", email, password=password_hash is not None)
                # Inside the transaction: no user row without its mailbox.
                path = create_mailbox(config, mailbox)
        except DirectoryError as e:
            audit_refusal(config, "user.add", email, e)
            raise
    login = "" if password_hash else " (no password: cannot log in)"
    where = f", mailbox {path}" if path else ""
    print(f"added {email}{where}{login}")
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = lookup_key(args.email)
    if email == lookup_key(config.postmaster):
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
        warn(f"still an alias target of {', '.join(referring)}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    with open_database(config) as db:
        users = db.list_users()
    print(
        table(
            ("EMAIL", "ENABLED", "LOGIN", "CREATED", "LAST LOGIN", "USED/QUOTA"),
            [_user_row(u) for u in users],
        )
    )
    return 0


def _user_row(user: User) -> tuple[str, ...]:
    return (
        user.email,
        "yes" if user.enabled else "no",
        "password" if user.password_hash else "none",
        when(user.created_at),
        when(user.last_login),
        quota.usage_cell(user),
    )


def cmd_user_passwd(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = lookup_key(args.email)
    with open_database(config) as db:
        db.require_user(email)  # before asking for a password nobody will use
    password_hash = new_hash(config, read_password(args, required=True))
    with open_database(config) as db:
        with db.transaction():
            db.set_password(email, password_hash)
            audit_change(db, "user.passwd", email)
    print(f"password set for {email}")
    return 0


def cmd_user_unlock(args: argparse.Namespace) -> int:
    """Clear the account's lockout (and those of the `--ip` addresses given), then
    say which address lockouts its recent failures came from still hold."""
    config = config_of(args)
    email = lookup_key(args.email)
    with open_database(config) as db:
        with db.transaction():
            db.require_user(email)
            cleared = db.clear_auth_failures(email)
            for address in args.ip:
                cleared += db.clear_client_failures(address)
            still = still_locked_clients(db, email, time.time(), config.auth)
            extra: dict[str, Any] = {"ip": args.ip} if args.ip else {}
            if still:
                extra["still_locked"] = [record.subject for record in still]
            audit_change(db, "user.unlock", email, cleared=cleared, **extra)
    print(f"unlocked {email} ({cleared} lockout record{'s' if cleared != 1 else ''} cleared)")
    for record in still:
        warn(
            f"client {record.subject} is still locked out until {stamp(record.locked_until)}"
            f" ({record.failures} failures, some of them for {email});"
            f" clear it with: mta-admin lockout clear --ip {record.subject}"
        )
    return 0


def cmd_user_set_send_as(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = lookup_key(args.email)
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
        warn(f"{target} is neither an enabled user nor an alias; mail for it is refused")
    return 0


def cmd_alias_del(args: argparse.Namespace) -> int:
    config = config_of(args)
    source = lookup_key(args.source)
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
