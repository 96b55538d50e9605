"""`mta-admin`: manage users, aliases and the queue of an installed mta.

A plain synchronous program (no reactor): it writes `<datadir>/mta.db` directly,
and the running daemon notices within a second (see `mta.directory`).  Every
user/alias change and its audit_log row are committed together.  Operator
mistakes (unknown user, duplicate, bad address, bad config) end with a one-line
message on stderr and exit status 1; usage errors exit 2, as argparse does.
Passwords are never taken from the command line, where `ps` and shell history
would see them: they come from a terminal prompt or from stdin.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import importlib
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from typing import Any

from mta.config import Config, ConfigError, build_config, load_config
from mta.db import (
    Database,
    DirectoryError,
    SchemaError,
    User,
    address_key,
    alias_source,
    mailbox_address,
    match_owner,
)
from mta.envelope import Address

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
        _error(str(e))
        return e.exit_code
    except (DirectoryError, ConfigError, SchemaError) as e:
        _error(str(e))
        return 1
    except sqlite3.Error as e:
        _error(f"database error: {e}")
        return 1
    except OSError as e:
        _error(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        return 1
    except KeyboardInterrupt:
        return 130


def _error(message: str) -> None:
    print(f"mta-admin: {message}", file=sys.stderr)


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

    check = leaf(commands, "check-config", cmd_check_config, "validate a config file")
    check.add_argument("path", nargs="?", metavar="PATH")

    queue = commands.add_parser("queue", help="the mail queue").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    leaf(queue, "list", cmd_queue_list, "list queued messages (like mailq)")
    leaf(queue, "show", cmd_queue_show, "envelope, recipient states and headers").add_argument(
        "qid", metavar="ID"
    )
    leaf(queue, "flush", cmd_queue_control, "retry every deferred message now")
    for name, text in (
        ("retry", "retry one deferred message now"),
        ("delete", "delete a message (active, held or dead)"),
        ("hold", "keep a message from being delivered"),
        ("release", "deliver a held message again"),
        ("requeue", "move a dead letter back to the active queue"),
    ):
        leaf(queue, name, cmd_queue_control, text).add_argument("qid", metavar="ID")
    leaf(queue, "dead", cmd_queue_dead, "list dead letters with their reasons")

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


def _config(args: argparse.Namespace) -> Config:
    return load_config(config_path(args), datadir=getattr(args, "datadir", None))


def _database(config: Config) -> Database:
    return Database(config.path("mta.db"))


def _operator() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers): still audit the change
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _audit(db: Database, action: str, username: str, **details: Any) -> None:
    db.record_audit(action, username, user_agent=USER_AGENT, details={"by": _operator(), **details})


def _audited_failure(config: Config, action: str, username: str, error: Exception) -> None:
    """Record a refused change too: repeated attempts are worth seeing in `audit`."""
    try:
        with _database(config) as db:
            db.record_audit(
                action,
                username,
                success=False,
                user_agent=USER_AGENT,
                details={"by": _operator(), "error": str(error)},
            )
    except (sqlite3.Error, SchemaError, OSError):
        pass  # the original error is the one to report


def _read_password(args: argparse.Namespace, *, required: bool) -> str | None:
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


def hash_password(config: Config, password: str) -> str:
    """Argon2id with the cost parameters of `[auth]`, as the AUTH checker verifies."""
    import argon2

    hasher = argon2.PasswordHasher(
        time_cost=config.auth.time_cost,
        memory_cost=config.auth.memory_cost,
        parallelism=config.auth.parallelism,
        type=argon2.Type.ID,
    )
    try:
        return hasher.hash(password)
    except argon2.exceptions.HashingError as e:
        raise CLIError(f"cannot hash password with the [auth] argon2 settings: {e}") from None


def create_maildir(config: Config, mailbox: Address) -> str | None:
    """Create `<datadir>/mail/<domain>/<local>/{tmp,new,cur}` for the maildir backend.

    Other backends create their mailboxes on first delivery.  Directories made by
    root go to the data directory's owner, so the daemon can deliver into them.
    """
    if config.storage.backend != "maildir":
        return None
    os.makedirs(config.datadir, mode=0o750, exist_ok=True)
    base = config.path("mail", mailbox.domain, mailbox.local)
    path = config.datadir
    for part in ("mail", mailbox.domain, mailbox.local):
        path = os.path.join(path, part)
        _make_dir(path, config.datadir)
    for sub in ("tmp", "new", "cur"):
        _make_dir(os.path.join(base, sub), config.datadir)
    return base


def _make_dir(path: str, owner_of: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise CLIError(f"{path} exists and is not a directory") from None
        return
    match_owner(path, owner_of)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    return "\n".join(lines)


# -- user ------------------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        mailbox = mailbox_address(args.email, config.local_domains)
    except DirectoryError as e:
        _audited_failure(config, "user.add", args.email, e)
        raise
    email = address_key(mailbox)
    password = _read_password(args, required=False)
    password_hash = hash_password(config, password) if password is not None else None
    with _database(config) as db:
        try:
            with db.transaction():
                db.add_user(email, password_hash, local_domains=config.local_domains)
                _audit(db, "user.add", email, password=password_hash is not None)
                # Inside the transaction: no user row without its mailbox.
                path = create_maildir(config, mailbox)
        except DirectoryError as e:
            _audited_failure(config, "user.add", email, e)
            raise
    login = "" if password_hash else " (no password: cannot log in)"
    where = f", mailbox {path}" if path else ""
    print(f"added {email}{where}{login}")
    return 0


def cmd_user_del(args: argparse.Namespace) -> int:
    config = _config(args)
    email = args.email.strip().lower()
    if email == config.postmaster.lower():
        raise CLIError(
            f"{email} is the configured postmaster; change `postmaster` in {config.source} first"
        )
    with _database(config) as db:
        try:
            with db.transaction():
                db.delete_user(email)
                _audit(db, "user.del", email)
        except DirectoryError as e:
            _audited_failure(config, "user.del", email, e)
            raise
        referring = sorted(src for src, targets in db.list_aliases().items() if email in targets)
    print(f"deleted {email} (its mail stays on disk)")
    if referring:
        print(
            f"mta-admin: warning: still an alias target of {', '.join(referring)}", file=sys.stderr
        )
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    config = _config(args)
    with _database(config) as db:
        users = db.list_users()
    print(
        _table(
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
        _when(user.created_at),
        _when(user.last_login),
        quota,
    )


def cmd_user_passwd(args: argparse.Namespace) -> int:
    config = _config(args)
    email = args.email.strip().lower()
    with _database(config) as db:
        db.require_user(email)  # before asking for a password nobody will use
    password_hash = hash_password(config, _read_password(args, required=True))
    with _database(config) as db:
        with db.transaction():
            db.set_password(email, password_hash)
            _audit(db, "user.passwd", email)
    print(f"password set for {email}")
    return 0


def cmd_user_unlock(args: argparse.Namespace) -> int:
    config = _config(args)
    email = args.email.strip().lower()
    with _database(config) as db:
        with db.transaction():
            db.require_user(email)
            cleared = db.clear_auth_failures(email)
            for address in args.ip:
                cleared += db.delete_auth_failure("ip:" + address.strip().lower())
            extra = {"ip": args.ip} if args.ip else {}
            _audit(db, "user.unlock", email, cleared=cleared, **extra)
    print(f"unlocked {email} ({cleared} lockout record{'s' if cleared != 1 else ''} cleared)")
    return 0


def cmd_user_set_send_as(args: argparse.Namespace) -> int:
    config = _config(args)
    email = args.email.strip().lower()
    with _database(config) as db:
        with db.transaction():
            db.set_send_as_any(email, args.scope == "any")
            _audit(db, "user.send_as", email, scope=args.scope)
    print(f"{email} may send as {'any address' if args.scope == 'any' else 'its own addresses'}")
    return 0


# -- alias -----------------------------------------------------------------------


def cmd_alias_add(args: argparse.Namespace) -> int:
    config = _config(args)
    with _database(config) as db:
        try:
            source = address_key(alias_source(args.source, config.local_domains))
            with db.transaction():
                targets = db.add_alias(source, args.targets, local_domains=config.local_domains)
                _audit(db, "alias.add", source, targets=targets)
        except DirectoryError as e:
            _audited_failure(config, "alias.add", args.source, e)
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
    config = _config(args)
    source = args.source.strip().lower()
    with _database(config) as db:
        try:
            with db.transaction():
                removed = db.delete_alias(source, args.targets)
                _audit(db, "alias.del", source, targets=removed)
        except DirectoryError as e:
            _audited_failure(config, "alias.del", source, e)
            raise
    print(f"removed {source} -> {', '.join(removed)}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    config = _config(args)
    with _database(config) as db:
        aliases = db.list_aliases()
    print(
        _table(
            ("SOURCE", "TARGETS"), [(src, ", ".join(targets)) for src, targets in aliases.items()]
        )
    )
    return 0


# -- check-config, queue, audit --------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    path = args.path or config_path(args)
    try:
        config = load_config(path, datadir=getattr(args, "datadir", None))
    except ConfigError as e:
        _error(str(e))
        return 1
    print(f"OK: {config.source}")
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = _config(args)
    try:
        # Imported here: the queue may be absent or broken, and user admin must still work.
        queue_inspect = importlib.import_module("mta.queue.inspect")
    except ModuleNotFoundError as e:
        if e.name not in ("mta.queue", "mta.queue.inspect"):
            raise
        raise CLIError("queue inspection is not available in this installation") from None
    entries = queue_inspect.list_entries(config.path("queue"))
    from mta.queue.control import held_summaries

    entries = sorted(
        entries + held_summaries(config.path("queue")), key=lambda s: (s.created, s.qid)
    )
    listing = queue_inspect.format_listing(entries)
    print(listing, end="" if listing.endswith("\n") else "\n")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    from mta.queue import control

    config = _config(args)
    try:
        print(control.describe(config.path("queue"), args.qid), end="")
    except control.ControlError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_queue_dead(args: argparse.Namespace) -> int:
    from mta.queue.inspect import format_listing, list_entries

    config = _config(args)
    listing = format_listing(list_entries(config.path("queue"), dead=True))
    print(listing.replace("Mail queue is empty", "No dead letters"), end="")
    return 0


def cmd_queue_control(args: argparse.Namespace) -> int:
    """flush/retry/hold/release/delete/requeue: through the running server's control
    directory when it runs, directly on the files (under its lock) otherwise."""
    from mta.queue import control

    config = _config(args)
    queue_root = config.path("queue")
    qid = getattr(args, "qid", None)
    try:
        roots = (
            control.spool_roots(queue_root) if qid is None else [control.locate(queue_root, qid)[0]]
        )
        for root in roots:
            if not os.path.isdir(root):
                continue
            lock = control.OwnerLock(root)
            if lock.acquire():
                try:
                    message = control.run_offline(root, args.action, qid, time.time())
                finally:
                    lock.release()
            else:
                message = control.send_command(root, args.action, qid)
            print(message)
    except control.ControlError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from mta.admin import dkim as dkim_keys

    config = _config(args)
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
    config = _config(args)
    with _database(config) as db:
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
    print(_table(("TIME", "USER", "ACTION", "RESULT", "IP", "DETAILS"), rows))
    return 0
