"""`mta-admin mail ...`: read local mail back, whatever the backend.

Everything goes through the configured `IMailStore` (`mta.storage.open_store`):
`list` shows each message's id, date, size and subject; `cat` writes the stored
bytes to stdout unchanged; `export` copies a mailbox into an mbox file or a Maildir
under a directory (by delivering into a store of that kind rooted there, so the
layout is the one the server writes: ``DIR/<domain>/<local>.mbox`` or
``DIR/<domain>/<local>/``); `delete` removes one message and gives its size back to
the user's quota (`mta.storage.quota`).
"""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import os
import sys
from typing import Any

from mta.admin.common import CLIError, config_of, open_database, table, when
from mta.db import database_errors, mailbox_address
from mta.storage import StoreItem, UnknownBackend, UnsafeMailboxName, open_store
from mta.storage.crypto import DecryptionError, KeyringError
from mta.storage.items import BytesBody
from mta.storage.quota import QuotaStore

EXPORT_FORMATS = ("mbox", "maildir")


def add_commands(commands: Any, leaf: Any) -> None:
    """`mail list|cat|export|delete`."""
    mail = commands.add_parser("mail", help="read local mail back").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    listing = leaf(mail, "list", cmd_mail_list, "list a mailbox: id, date, size, subject")
    listing.add_argument("email", metavar="EMAIL")
    listing.add_argument("--folder", metavar="F", help="only this folder (default: all)")
    cat = leaf(mail, "cat", cmd_mail_cat, "write one message, exactly as stored, to stdout")
    cat.add_argument("email", metavar="EMAIL")
    cat.add_argument("message_id", metavar="ID")
    export = leaf(mail, "export", cmd_mail_export, "copy a mailbox into an mbox or a Maildir")
    export.add_argument("email", metavar="EMAIL")
    export.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    export.add_argument("directory", metavar="DIR")
    delete = leaf(mail, "delete", cmd_mail_delete, "delete one message")
    delete.add_argument("email", metavar="EMAIL")
    delete.add_argument("message_id", metavar="ID")


def _store_and_mailbox(args: argparse.Namespace):
    config = config_of(args)
    mailbox = mailbox_address(args.email)
    try:
        return config, open_store(config), mailbox
    except (UnknownBackend, KeyringError) as e:
        raise CLIError(str(e)) from None


def _messages(store, mailbox, email: str) -> list:
    try:
        return store.list_messages(mailbox)
    except UnsafeMailboxName as e:
        raise CLIError(f"{email}: {e}") from None


def _read(store, mailbox, email: str, message_id: str) -> bytes:
    try:
        return store.read_message(mailbox, message_id)
    except KeyError:
        raise CLIError(f"{email}: no message {message_id}") from None
    except UnsafeMailboxName as e:
        raise CLIError(f"{email}: {e}") from None
    except DecryptionError as e:
        raise CLIError(f"{email}: {message_id}: {e}") from None


def subject_of(data: bytes) -> str:
    """The decoded Subject header of a message (CRLF or LF lines), or ''."""
    end = min((i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0), default=-1)
    head = data if end < 0 else data[: end + 2]
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        subject = str(parsed.get("Subject", ""))
    except Exception:  # a malformed header: show what can be shown
        return ""
    return " ".join(subject.split())


def cmd_mail_list(args: argparse.Namespace) -> int:
    _, store, mailbox = _store_and_mailbox(args)
    messages = _messages(store, mailbox, args.email)
    if args.folder is not None:
        messages = [m for m in messages if m.folder == args.folder]
    if not messages:
        print(f"No mail for {args.email}")
        return 0
    rows = []
    for m in messages:
        try:
            subject = subject_of(store.read_message(mailbox, m.message_id)[:65536])
        except KeyError:  # deleted meanwhile
            continue
        except DecryptionError as e:
            subject = f"(cannot decrypt: {e})"
        rows.append((m.message_id, when(m.received), str(m.size), m.folder, subject))
    print(table(("ID", "DATE", "SIZE", "FOLDER", "SUBJECT"), rows))
    return 0


def cmd_mail_cat(args: argparse.Namespace) -> int:
    _, store, mailbox = _store_and_mailbox(args)
    data = _read(store, mailbox, args.email, args.message_id)
    out = sys.stdout.buffer
    out.write(data)
    out.flush()
    return 0


def cmd_mail_delete(args: argparse.Namespace) -> int:
    config, store, mailbox = _store_and_mailbox(args)
    with open_database(config) as db:
        try:
            # Through the quota layer, so the user's usage goes down with it.
            QuotaStore(store, lambda: db).delete_message(mailbox, args.message_id)
        except KeyError:
            raise CLIError(f"{args.email}: no message {args.message_id}") from None
        except (UnsafeMailboxName, OSError) as e:  # OSError: the store's, nothing deleted
            raise CLIError(f"{args.email}: {e}") from None
        except database_errors() as e:  # the message is gone; its size was not given back
            raise CLIError(
                f"deleted {args.message_id}, but the usage of {args.email} was not updated"
                f" ({e}): run mta-admin user quota {args.email} --recount"
            ) from None
    print(f"deleted {args.message_id} from {args.email}")
    return 0


def cmd_mail_export(args: argparse.Namespace) -> int:
    config, store, mailbox = _store_and_mailbox(args)
    messages = _messages(store, mailbox, args.email)
    os.makedirs(args.directory, mode=0o700, exist_ok=True)
    if args.format == "mbox":
        from mta.storage.mbox import MboxStore

        target = MboxStore(args.directory)
    else:
        from mta.storage.maildir import MaildirStore

        target = MaildirStore(args.directory, config.hostname)
    if target.list_messages(mailbox):
        raise CLIError(f"{args.directory} already holds mail for {args.email}: not mixing them")
    where = target.create_mailbox(mailbox)
    count = 0
    for i, m in enumerate(messages):
        try:
            data = store.read_message(mailbox, m.message_id)
        except KeyError:  # deleted meanwhile
            continue
        except DecryptionError as e:
            raise CLIError(f"{args.email}: {m.message_id}: {e}") from None
        [outcome] = target.deliver_batch([StoreItem(mailbox, f"export-{i}", b"", BytesBody(data))])
        if isinstance(outcome, BaseException):
            raise outcome
        count += 1
    print(f"exported {count} message{'' if count == 1 else 's'} to {where}")
    return 0
