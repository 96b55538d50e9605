"""`mta-admin lockout list|clear`: AUTH lockouts of accounts and client addresses.

The daemon (`mta.policy.lockout`) counts AUTH failures per account and per client
address in the `auth_failures` table of mta.db and locks a key after `[auth]
max_failures` failures within `failure_window`, for `lockout_seconds`.  The two are
separate records: clearing an account leaves the address it was attacked from
locked, and the other way round.  `lockout list` shows both; `lockout clear` takes
an account, `--ip` addresses, or both; `user unlock` names the address locks that
its user's recent failures came from (`still_locked_clients`).  The running daemon
re-reads a cached lockout within seconds.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.admin.common import CLIError, audit_change, config_of, open_database, table
from mta.db import IP_PREFIX, AuthFailure, Database, lookup_key, same_client


def add_commands(commands: Any, leaf: Any) -> None:
    """`lockout list|clear`."""
    lockout = commands.add_parser("lockout", help="AUTH lockouts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    listing = leaf(
        lockout, "list", cmd_lockout_list, "active AUTH lockouts of accounts and client addresses"
    )
    listing.add_argument(
        "--all", action="store_true", help="also the records still counting failures"
    )
    clear = leaf(
        lockout, "clear", cmd_lockout_clear, "clear the AUTH lockout of an account or an address"
    )
    clear.add_argument("key", nargs="?", metavar="EMAIL", help="the account (a login name)")
    clear.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="the client address (repeatable)",
    )


def stamp(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def lockout_rows(records: list[AuthFailure], now: float) -> list[tuple[str, ...]]:
    """Table rows for `records`: accounts first, then addresses, each sorted."""
    records = sorted(records, key=lambda r: (r.kind != "account", r.subject))
    return [
        (
            r.kind,
            r.subject,
            str(r.failures),
            stamp(r.first_failure),
            stamp(r.locked_until) if r.locked_at(now) else "-",
        )
        for r in records
    ]


def cmd_lockout_list(args: argparse.Namespace) -> int:
    config = config_of(args)
    now = time.time()
    with open_database(config) as db:
        records = db.list_auth_failures(locked_at=None if args.all else now)
    if not records:
        print("No AUTH failure records" if args.all else "No active lockouts")
        return 0
    print(
        table(
            ("KIND", "KEY", "FAILURES", "FIRST FAILURE", "LOCKED UNTIL"),
            lockout_rows(records, now),
        )
    )
    return 0


def cmd_lockout_clear(args: argparse.Namespace) -> int:
    accounts, clients = [], list(args.ip)
    if args.key:
        if args.key.startswith(IP_PREFIX):  # as `lockout list` might be copied from
            clients.append(args.key[len(IP_PREFIX) :])
        else:
            accounts.append(lookup_key(args.key))
    if not accounts and not clients:
        raise CLIError("name an account (EMAIL) or a client address (--ip ADDRESS)", exit_code=2)
    config = config_of(args)
    results = []
    with open_database(config) as db:
        with db.transaction():
            for account in accounts:
                results.append((account, db.clear_auth_failures(account)))
            for client in clients:
                results.append((f"client {client.strip()}", db.clear_client_failures(client)))
            total = sum(n for _, n in results)
            if total:
                audit_change(
                    db,
                    "lockout.clear",
                    accounts[0] if accounts else None,
                    cleared=total,
                    **({"ip": clients} if clients else {}),
                )
    if not total:
        raise CLIError(f"no lockout record for {', '.join(name for name, _ in results)}")
    for name, count in results:
        if count:
            print(f"cleared {name} ({count} lockout record{'s' if count != 1 else ''})")
        else:
            print(f"no lockout record for {name}")
    return 0


def still_locked_clients(db: Database, username: str, now: float, auth: Any) -> list[AuthFailure]:
    """Client-address lockouts active at `now` that `username`'s recent AUTH
    failures came from (per the audit log; "recent": early enough to have counted
    towards a lockout that has not ended, `failure_window + lockout_seconds`)."""
    since = now - auth.failure_window - auth.lockout_seconds
    sources = {
        entry.ip_address
        for entry in db.audit_entries(username=username, since=since, actions=("auth.failure",))
        if entry.ip_address
    }
    return [
        record
        for record in db.list_auth_failures(locked_at=now)
        if record.kind == "ip" and any(same_client(record.subject, ip) for ip in sources)
    ]
