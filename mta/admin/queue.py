"""`mta-admin queue ...`: list, show and act on the mail queue.

The queue modules are imported inside each command: the queue may be absent or
broken, and user administration must still work.  Actions reach the running
server through its control directory, or act on the files directly (under the
spool's lock) when no server owns them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from typing import Any

from mta.admin.cli import CLIError, config_of


def add_commands(commands: Any, leaf: Any) -> None:
    """`queue list|show|flush|retry|delete|hold|release|requeue|dead`."""
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


def cmd_queue_list(args: argparse.Namespace) -> int:
    config = config_of(args)
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

    config = config_of(args)
    try:
        print(control.describe(config.path("queue"), args.qid), end="")
    except control.ControlError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_queue_dead(args: argparse.Namespace) -> int:
    from mta.queue.inspect import format_listing, list_entries

    config = config_of(args)
    listing = format_listing(list_entries(config.path("queue"), dead=True))
    print(listing.replace("Mail queue is empty", "No dead letters"), end="")
    return 0


def cmd_queue_control(args: argparse.Namespace) -> int:
    """flush/retry/hold/release/delete/requeue: through the running server's control
    directory when it runs, directly on the files (under its lock) otherwise."""
    from mta.queue import control

    config = config_of(args)
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
