"""`mta-admin queue ...`: list, show and act on the mail queue.

Everything goes through the queue's `IQueueControl` (`mta.queue.open_queue_control`
picks the one of `[queue] backend`), imported inside each command: the queue may be
absent or broken, and user administration must still work.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from mta.admin.common import CLIError, config_of


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


def _import(name: str):
    # Imported here: the queue may be absent or broken, and user admin must still work.
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and not name.startswith(e.name):
            raise
        raise CLIError("queue administration is not available in this installation") from None


def _control(args: argparse.Namespace):
    """The queue's `IQueueControl` for the configured backend."""
    config = config_of(args)
    queue = _import("mta.queue")
    try:
        return queue.open_queue_control(config)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _listing(summaries) -> str:
    return _import("mta.queue.inspect").format_listing(summaries)


def cmd_queue_list(args: argparse.Namespace) -> int:
    _import("mta.queue.inspect")
    listing = _listing(_control(args).list())
    print(listing, end="" if listing.endswith("\n") else "\n")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    from mta.queue.control import ControlError

    control = _control(args)
    try:
        print(control.show(args.qid), end="")
    except ControlError as e:
        raise CLIError(str(e)) from None
    return 0


def cmd_queue_dead(args: argparse.Namespace) -> int:
    _import("mta.queue.inspect")
    listing = _listing(_control(args).list(dead=True))
    print(listing.replace("Mail queue is empty", "No dead letters"), end="")
    return 0


def cmd_queue_control(args: argparse.Namespace) -> int:
    """flush/retry/hold/release/delete/requeue: through the running server when it
    runs, directly on the stored queue otherwise (IQueueControl decides)."""
    from mta.queue.control import ControlError

    control = _control(args)
    try:
        print(control.act(args.action, getattr(args, "qid", None)))
    except ControlError as e:
        raise CLIError(str(e)) from None
    return 0
