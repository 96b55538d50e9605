"""The canonical form of the addresses `mta.db` stores: users, alias sources and targets.

Addresses are validated here rather than in the CLI so that every writer stores the
same form: lower-case, and for mailbox users a local part that is safe as a
directory name (the Maildir path is built from it).
"""

from __future__ import annotations

import re
from collections.abc import Collection

from mta.db.errors import InvalidAddress
from mta.envelope import Address, AddressError, parse_mailbox

# Lower-case only, and nothing a path could misread: no '/', no leading '.', no '..'.
_SAFE_LOCAL = re.compile(r"[a-z0-9_+-][a-z0-9._+-]*\Z")


def fold(text: str) -> str:
    """The comparison form of a local part (or of a whole `local@domain`)."""
    return text.lower()


def address_key(address: Address) -> str:
    """The string a mailbox or alias is stored and looked up under."""
    return f"{address.local.lower()}@{address.domain.lower()}"


def lookup_key(email: str) -> str:
    """`address_key` for an address typed by someone (CLI argument, AUTH name)."""
    return fold(email.strip())


def mailbox_address(email: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate and canonicalise the address of a mailbox user.

    Raises `InvalidAddress` with a message saying what is wrong.  The local part
    becomes a directory name under `<datadir>/mail/<domain>/`, hence the strict
    character set.
    """
    address = _parse(email, "user")
    local = address.local.lower()
    if not _SAFE_LOCAL.match(local) or ".." in local:
        raise InvalidAddress(
            f"{email}: a mailbox local part may only contain a-z 0-9 . _ + - "
            "and must not start with '.' or contain '..'"
        )
    if address.domain.startswith("["):
        raise InvalidAddress(f"{email}: a mailbox needs a domain name, not an address literal")
    _check_local_domain(email, address.domain, local_domains)
    return Address(local, address.domain)


def alias_source(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate the source of an alias: an address in a local domain, lower-cased."""
    address = _parse(text, "alias")
    local = address.local.lower()
    if local == "postmaster":
        raise InvalidAddress(
            f"{text}: postmaster@ always goes to the configured postmaster; "
            "change `postmaster` in the config instead"
        )
    _check_local_domain(text, address.domain, local_domains)
    return Address(local, address.domain)


def alias_target(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate an alias target: any mailbox; lower-cased when it is local.

    A remote local part keeps its case: only the remote host may interpret it.
    """
    address = _parse(text, "target", utf8=True)
    if local_domains is not None and address.domain in local_domains:
        return Address(address.local.lower(), address.domain)
    return address


def _parse(text: str, what: str, *, utf8: bool = False) -> Address:
    try:
        return parse_mailbox(text.strip(), utf8=utf8)
    except AddressError as e:
        raise InvalidAddress(f"{text!r} is not a valid {what} address: {e}") from None


def _check_local_domain(text: str, domain: str, local_domains: Collection[str] | None) -> None:
    if local_domains is not None and domain not in local_domains:
        known = ", ".join(local_domains) or "(none)"
        raise InvalidAddress(
            f"{text}: domain {domain!r} is not a local domain (local_domains: {known})"
        )
