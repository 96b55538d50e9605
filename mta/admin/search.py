"""``mta-admin search QUERY [--user EMAIL] [--since 7d] [--limit N]``: full-text
search over the SQL mail store (`mta.storage.sql.SQLStore.search`).

Every word of QUERY must occur (in subject, from, to or body text); words are
searched for as text, never parsed as FTS5 syntax.  One line per match, newest
first: date, from, subject, mailbox and the store's id of the message.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.admin.common import CLIError, config_of, parse_since, table
from mta.storage import UnknownBackend, open_store


def add_commands(commands: Any, leaf: Any) -> None:
    search = leaf(commands, "search", cmd_search, "full-text search of stored mail")
    search.add_argument("query", metavar="QUERY", help="words that must all occur")
    search.add_argument("--user", metavar="EMAIL", help="only this mailbox")
    search.add_argument(
        "--since",
        metavar="T",
        type=parse_since,
        help="by Date: header; ISO date/time or seconds ago (3600, or 90m, 2h, 7d)",
    )
    search.add_argument("--limit", type=_positive, default=50, help="newest N matches (default 50)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number")
    return value


def cmd_search(args: argparse.Namespace) -> int:
    config = config_of(args)
    try:
        store = open_store(config)
    except UnknownBackend as e:
        raise CLIError(str(e)) from None
    if not hasattr(store, "search"):
        raise CLIError(f'search needs [storage] backend = "sql" (this config uses {store.name!r})')
    try:
        hits = store.search(args.query, user=args.user, since=args.since, limit=args.limit)
    finally:
        store.close()
    rows = [
        (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(hit.date)),
            _cell(hit.from_addr),
            _cell(hit.subject),
            hit.user,
            hit.message_id,
        )
        for hit in hits
    ]
    if rows:
        print(table(("DATE", "FROM", "SUBJECT", "MAILBOX", "ID"), rows))
    return 0


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(text.split()) or "-"
    return text if len(text) <= width else text[: width - 1] + "…"
