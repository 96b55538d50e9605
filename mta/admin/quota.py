"""`mta-admin user quota` and `user show`: a user's quota and what its mailbox holds.

Quotas are whole MB (MiB, 1,048,576 bytes); 0 or ``none`` means no quota.  Usage is
kept by the server as mail is delivered and deleted (`mta.storage.quota`);
``--recount`` recomputes it from the mailbox itself, after a crash mid-delivery or
mail removed behind the server's back.  A recount while mail arrives for the same
mailbox may be off by those messages; recounting again settles it.
"""

from __future__ import annotations

import argparse
from typing import Any

from mta.admin.common import CLIError, audit_change, config_of, open_database, when
from mta.db import MIB, User, lookup_key, mailbox_address
from mta.storage import UnknownBackend, UnsafeMailboxName, open_store
from mta.storage.crypto import KeyringError
from mta.storage.quota import QuotaStore

_UNLIMITED = ("none", "unlimited", "0")
_MAX_QUOTA_MB = 1 << 40  # 1 EiB: anything larger is a typing error


def add_commands(user: Any, leaf: Any) -> None:
    """`user quota EMAIL [MB] [--recount]` and `user show EMAIL` (under `user`)."""
    quota = leaf(user, "quota", cmd_user_quota, "show or set a user's quota (MB; 0 or none: none)")
    quota.add_argument("email", metavar="EMAIL")
    quota.add_argument("megabytes", nargs="?", type=quota_argument, metavar="MB")
    quota.add_argument(
        "--recount",
        action="store_true",
        help="recompute the usage from the mailbox (reads every message)",
    )
    leaf(user, "show", cmd_user_show, "a user's settings, quota and usage").add_argument(
        "email", metavar="EMAIL"
    )


def quota_argument(text: str) -> int:
    """MB as typed: a whole number, 0/none/unlimited for no quota (returned as 0)."""
    word = text.strip().lower()
    if word in _UNLIMITED:
        return 0
    try:
        value = int(word)
    except ValueError:
        value = -1
    if not 0 <= value <= _MAX_QUOTA_MB:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a whole number of MB, or none for no quota"
        )
    return value


def megabytes(n_bytes: int) -> str:
    """Bytes as MB for people: 0, 1.2, 123."""
    if n_bytes <= 0:
        return "0"
    value = n_bytes / MIB
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def usage_cell(user: User) -> str:
    """`used/quota MB` for tables; `-` for no quota."""
    quota = "-" if user.quota_mb is None else str(user.quota_mb)
    return f"{megabytes(user.used_bytes)}/{quota} MB"


def describe(user: User) -> str:
    used = f"{megabytes(user.used_bytes)} MB used"
    if user.quota_bytes is None:
        return f"{user.email}: {used}, no quota"
    percent = int(100 * user.used_bytes / user.quota_bytes)
    return f"{user.email}: {used} of {user.quota_mb} MB ({percent}%)"


def cmd_user_quota(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = lookup_key(args.email)
    with open_database(config) as db:
        before = db.require_user(email)
        if args.megabytes is not None:
            with db.transaction():
                db.set_quota(email, args.megabytes)
                audit_change(db, "user.quota", email, quota_mb=args.megabytes or None)
        if args.recount:
            try:
                store = QuotaStore(open_store(config), lambda: db)
                total = store.recount(mailbox_address(before.email))
            except (UnknownBackend, KeyringError, UnsafeMailboxName) as e:
                raise CLIError(f"{email}: {e}") from None
            audit_change(db, "user.quota_recount", email, before=before.used_bytes, after=total)
        user = db.require_user(email)
    if args.recount and user.used_bytes != before.used_bytes:
        print(f"recounted {email}: was {megabytes(before.used_bytes)} MB")
    print(describe(user))
    return 0


def cmd_user_show(args: argparse.Namespace) -> int:
    config = config_of(args)
    email = lookup_key(args.email)
    with open_database(config) as db:
        user = db.require_user(email)
        send_as_any = db.send_as_any(email)
    if user.quota_bytes is None:
        quota = "none"
    else:
        quota = f"{user.quota_mb} MB"
    rows = [
        ("email", user.email),
        ("enabled", "yes" if user.enabled else "no"),
        ("login", "password" if user.password_hash else "none"),
        ("send as", "any address" if send_as_any else "own addresses"),
        ("created", when(user.created_at)),
        ("last login", when(user.last_login)),
        ("quota", quota),
        ("used", describe(user).split(": ", 1)[1]),
    ]
    for name, value in rows:
        print(f"{name + ':':<12}{value}")
    return 0
