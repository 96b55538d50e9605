"""`mta-admin quarantine list|show|release|delete`: messages a policy check held.

The quarantine is ``<datadir>/quarantine/`` (`mta.delivery.quarantine`): one
``<id>.eml`` (the message as it would have been delivered) and one ``<id>.json``
sidecar (envelope, reasons, time) per message.

``release`` puts the message back into the queue as it would have been delivered,
without SMTP (so no policy check sees it again): it is written into the queue on
hold with its original envelope, the quarantine cleared and an
``X-Quarantine-Released:`` header added (`mta.queue.hold_message`), then released
with the queue's ordinary ``release`` action, through the running server when there
is one.  The quarantine copy is removed once the message is in the queue.
"""

from __future__ import annotations

import argparse
import email.utils
from typing import Any

from mta.admin.common import CLIError, config_of, table, when


def add_commands(commands: Any, leaf: Any) -> None:
    """`quarantine list|show|release|delete`."""
    group = commands.add_parser("quarantine", help="messages held by a policy check")
    sub = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    leaf(sub, "list", cmd_list, "list quarantined messages")
    show = leaf(sub, "show", cmd_show, "envelope, reasons and the message's headers")
    show.add_argument("qid", metavar="ID")
    show.add_argument("--full", action="store_true", help="print the whole message")
    leaf(sub, "release", cmd_release, "deliver a quarantined message after all").add_argument(
        "qid", metavar="ID"
    )
    leaf(sub, "delete", cmd_delete, "delete a quarantined message").add_argument(
        "qid", metavar="ID"
    )


def _directory(args: argparse.Namespace) -> str:
    return config_of(args).path("quarantine")


def _message(config, qid: str) -> bytes:
    """The quarantined message, decrypted when encryption at rest is on."""
    from mta.crypto.keys import DecryptionError, KeyringError, open_keyring
    from mta.delivery.quarantine import NotQuarantined, read_message

    try:
        keyring = None
        if config.storage.encrypt or config.queue.encrypt:
            keyring = open_keyring(config)
        return read_message(config.path("quarantine"), qid, keyring)
    except NotQuarantined as e:
        raise CLIError(str(e)) from None
    except (KeyringError, DecryptionError) as e:
        raise CLIError(f"{qid}: {e}") from None


def _address(pair) -> str:
    local, domain = pair
    return f"{local}@{domain}" if domain else local


def _record(directory: str, qid: str) -> dict:
    from mta.delivery.quarantine import NotQuarantined, read_record

    try:
        return read_record(directory, qid)
    except NotQuarantined as e:
        raise CLIError(str(e)) from None
    except ValueError as e:
        raise CLIError(f"{qid}: unreadable quarantine record: {e}") from None


def cmd_list(args: argparse.Namespace) -> int:
    from mta.delivery.quarantine import list_quarantine

    records = list_quarantine(_directory(args))
    if not records:
        print("Quarantine is empty")
        return 0
    rows = [
        [
            r.get("qid", "?"),
            when(r.get("quarantined_at")),
            f"<{_address(r['sender'])}>",
            ", ".join(_address(a) for a in r.get("recipients", ())),
            "; ".join(r.get("reasons", ())),
        ]
        for r in records
    ]
    print(table(["ID", "QUARANTINED", "FROM", "TO", "REASON"], rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    config = config_of(args)
    record = _record(config.path("quarantine"), args.qid)
    message = _message(config, args.qid)
    lines = [
        f"ID: {record.get('qid')}",
        f"Quarantined: {when(record.get('quarantined_at'))}",
        f"Reasons: {'; '.join(record.get('reasons', ())) or '-'}",
        f"From: <{_address(record['sender'])}>",
        *(f"To: <{_address(a)}>" for a in record.get("recipients", ())),
        f"Client: {record.get('client_name') or '-'} [{record.get('client_address') or '-'}]",
        f"Size: {len(message)}",
        "",
    ]
    print("\n".join(lines))
    if args.full:
        text = message
    else:
        end = message.find(b"\r\n\r\n")
        text = message if end < 0 else message[: end + 2]
    print(text.decode("utf-8", "replace").replace("\r\n", "\n"), end="")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from mta.delivery.quarantine import delete_quarantined, record_envelope
    from mta.queue import hold_message
    from mta.queue.control import ControlError

    config = config_of(args)
    directory = config.path("quarantine")
    record = _record(directory, args.qid)
    message = _message(config, args.qid)
    try:
        envelope = record_envelope(record)
    except (KeyError, TypeError, ValueError) as e:
        raise CLIError(f"{args.qid}: unreadable quarantine record: {e}") from None
    note = (
        f"X-Quarantine-Released: {args.qid} by mta-admin;"
        f" {email.utils.formatdate(localtime=True)}\r\n"
    ).encode()
    try:
        qid = hold_message(config, envelope, message, note)
    except (OSError, ValueError) as e:
        raise CLIError(f"{args.qid}: cannot queue the message: {e}") from None
    delete_quarantined(directory, args.qid)
    from mta.queue import open_queue_control

    try:
        open_queue_control(config).act("release", qid)
    except ControlError as e:
        raise CLIError(
            f"{args.qid} is in the queue as {qid}, on hold: {e};"
            f" release it with `mta-admin queue release {qid}`"
        ) from None
    print(f"{args.qid} released: queued as {qid}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from mta.delivery.quarantine import NotQuarantined, delete_quarantined

    try:
        delete_quarantined(_directory(args), args.qid)
    except NotQuarantined as e:
        raise CLIError(str(e)) from None
    print(f"{args.qid} deleted")
    return 0
