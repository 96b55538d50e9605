"""`mta-admin spam learn --spam|--ham [--user EMAIL] ID`: teach spamd's Bayes database.

The message is a quarantined one (``ID`` from `mta-admin quarantine list`) or, with
``--user``, one delivered to that mailbox (``ID`` from `mta-admin mail list EMAIL`,
read through the configured mail store, decrypted).  It goes to the spamd of
``[checks] spamd`` with the SPAMC ``TELL`` command (``Message-class: spam|ham``,
``Set: local``), which needs spamd started with ``--allow-tell``.  What is sent is
what the spamd check sends: at most ``spam_max_size`` bytes, and without the
``X-Spam-*`` headers the check added (Bayes learns the message, not our verdict).
Learning does not move the message: release or delete it as usual.
"""

from __future__ import annotations

import argparse
from typing import Any

from mta.admin.common import CLIError, config_of

# Learning updates spamd's database on disk: slower than a scan, and nobody waits on it.
TELL_TIMEOUT = 120.0


def add_commands(commands: Any, leaf: Any) -> None:
    """`spam learn`."""
    group = commands.add_parser("spam", help="teach spamd's Bayes filter")
    sub = group.add_subparsers(dest="action", metavar="ACTION", required=True)
    learn = leaf(
        sub,
        "learn",
        cmd_learn,
        "teach spamd ([checks] spamd) that a quarantined or delivered message is spam or ham",
    )
    kind = learn.add_mutually_exclusive_group(required=True)
    kind.add_argument("--spam", dest="spam", action="store_true", help="the message is spam")
    kind.add_argument("--ham", dest="spam", action="store_false", help="the message is not spam")
    learn.add_argument(
        "--user",
        metavar="EMAIL",
        help="ID is a message in this mailbox (`mail list EMAIL`), not in the quarantine",
    )
    learn.add_argument("message_id", metavar="ID")


def _quarantined(config, qid: str) -> bytes:
    from mta.delivery.quarantine import NotQuarantined, read_message

    try:
        return read_message(config.path("quarantine"), qid)
    except NotQuarantined as e:
        raise CLIError(f"{e} (for a delivered message, give --user EMAIL)") from None


def _delivered(config, email: str, message_id: str) -> bytes:
    from mta.db import mailbox_address
    from mta.storage import UnknownBackend, UnsafeMailboxName, open_store
    from mta.storage.crypto import DecryptionError, KeyringError

    mailbox = mailbox_address(email)
    try:
        return open_store(config).read_message(mailbox, message_id)
    except KeyError:
        raise CLIError(f"{email}: no message {message_id}") from None
    except (UnknownBackend, KeyringError) as e:
        raise CLIError(str(e)) from None
    except UnsafeMailboxName as e:
        raise CLIError(f"{email}: {e}") from None
    except DecryptionError as e:
        raise CLIError(f"{email}: {message_id}: {e}") from None


def cmd_learn(args: argparse.Namespace) -> int:
    from mta.policy.daemons import DaemonError
    from mta.policy.spamd import strip_spam_headers, tell_blocking

    config = config_of(args)
    address = config.checks.spamd
    if not address:
        raise CLIError(f"[checks] spamd is not set in {config.source}: there is no spamd to teach")
    if args.user is None:
        message, what = _quarantined(config, args.message_id), args.message_id
    else:
        message = _delivered(config, args.user, args.message_id)
        what = f"{args.message_id} of {args.user}"
    message = strip_spam_headers(message)[: config.checks.spam_max_size]
    kind = "spam" if args.spam else "ham"
    try:
        result = tell_blocking(address, message, args.spam, timeout=TELL_TIMEOUT)
    except DaemonError as e:
        raise CLIError(f"{what}: {e}") from None
    if result.learned:
        print(f"{what}: spamd learned it as {kind}")
    else:
        print(f"{what}: spamd already knew it as {kind} (nothing changed)")
    return 0
