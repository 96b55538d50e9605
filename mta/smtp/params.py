"""MAIL FROM and RCPT TO: their ESMTP parameters and addresses, as pure functions.

Each function returns the parsed value or raises `CommandError` carrying the exact
reply for the client (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531 SMTPUTF8, RFC 3461 RET,
ENVID, NOTIFY and ORCPT, RFC 4954 AUTH).  The session decides what to do with the
values; nothing here knows about a connection.
"""

from __future__ import annotations

import attrs

from mta.envelope import Address, AddressError, BodyType, Reply, parse_path
from mta.smtp import replies as R
from mta.smtp.parse import CommandError, notify_param, orcpt_param, xtext_param


@attrs.frozen(slots=True)
class MailParams:
    """What MAIL FROM's parameters asked for; `size` is the declared SIZE or 0."""

    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    size: int = 0


NO_MAIL_PARAMS = MailParams()


def mail_params(params: dict[str, str | None], *, max_size: int, auth_enabled: bool) -> MailParams:
    """Validate MAIL FROM parameters (already split by `parse.split_path_argument`)."""
    if not params:
        return NO_MAIL_PARAMS
    smtputf8 = False
    body = BodyType.SEVEN_BIT
    ret = envid = None
    size = 0
    for name, value in params.items():
        if name == "SIZE":
            if not value or not value.isdigit() or len(value) > 20:
                raise CommandError(Reply(501, "5.5.4", "Bad SIZE parameter"))
            size = int(value)
            if size > max_size:
                raise CommandError(R.TOO_BIG)
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise CommandError(Reply(555, "5.5.4", "Unsupported BODY type"))
            body = BodyType.EIGHT_BIT if value.upper() == "8BITMIME" else BodyType.SEVEN_BIT
        elif name == "SMTPUTF8":
            if value is not None:
                raise CommandError(Reply(555, "5.5.4", "SMTPUTF8 takes no value"))
            smtputf8 = True
        elif name == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise CommandError(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
            ret = value.upper()
        elif name == "ENVID":
            envid = xtext_param(value, 100)
            if envid is None:
                raise CommandError(Reply(501, "5.5.4", "Bad ENVID parameter"))
        elif name == "AUTH" and auth_enabled:
            pass  # RFC 4954 5: accepted; we do not relay the submitter identity
        else:
            raise CommandError(Reply(555, "5.5.4", f"Unsupported parameter {R.printable(name)}"))
    return MailParams(body, smtputf8, ret, envid, size)


def rcpt_params(params: dict[str, str | None]) -> tuple[str, str]:
    """RCPT TO parameters: the normalised (NOTIFY, ORCPT), "" for those not given."""
    notify = orcpt = ""
    for name, value in params.items():
        if name == "NOTIFY":
            notify = notify_param(value)
            if not notify:
                raise CommandError(
                    Reply(501, "5.5.4", "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
                )
        elif name == "ORCPT":
            orcpt = orcpt_param(value)
            if not orcpt:
                raise CommandError(Reply(501, "5.5.4", "Bad ORCPT parameter"))
        else:
            raise CommandError(Reply(555, "5.5.4", f"Unsupported parameter {R.printable(name)}"))
    return notify, orcpt


def parse_sender(path: str, smtputf8: bool) -> Address:
    """The MAIL FROM reverse-path (the null sender allowed)."""
    try:
        sender = parse_path(path, utf8=smtputf8, allow_null=True)
    except AddressError as e:
        if not smtputf8 and not path.isascii():
            raise CommandError(R.NEED_SMTPUTF8) from None
        raise CommandError(Reply(501, "5.1.7", f"Bad sender address syntax: {e}")) from None
    if not sender.is_null and not sender.domain:
        raise CommandError(Reply(501, "5.1.7", "Bad sender address syntax: domain required"))
    return sender


def parse_recipient(path: str, smtputf8: bool) -> Address:
    """The RCPT TO forward-path (`<postmaster>` has an empty domain)."""
    try:
        return parse_path(path, utf8=smtputf8)
    except AddressError as e:
        if not smtputf8 and not path.isascii():
            raise CommandError(R.NEED_SMTPUTF8) from None
        raise CommandError(Reply(501, "5.1.3", f"Bad recipient address syntax: {e}")) from None
