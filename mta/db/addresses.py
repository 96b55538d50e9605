"""The canonical form of the addresses `mta.db` stores: users, alias sources and targets.

Addresses are validated here rather than in the CLI so that every writer stores the
same form, and every reader looks up with it.  Local parts may be UTF-8 (RFC 6531,
RFC 6532): they are compared after Unicode NFC normalisation and lower-casing
(`fold`), so `jos\\u00e9` and `jose\\u0301` are one mailbox.  Domains are unchanged:
ASCII (an internationalised domain is configured by its A-label, `xn--...`).

A mailbox user's local part also becomes a directory name under
`<datadir>/mail/<domain>/`, hence its stricter character set: letters and digits
of any script, and `. _ + -`; never a leading `.` nor `..`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Collection

from mta.db.errors import InvalidAddress
from mta.envelope import MAX_LOCAL_PART, Address, AddressError, parse_mailbox

_SAFE_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._+-")
# Unicode general categories allowed beyond ASCII: letters, combining marks, digits.
# Not spaces, controls, format characters (bidi overrides, zero-width joiners),
# symbols or private-use characters: a mailbox name must read as what it is.
_SAFE_CATEGORIES = frozenset("LMN")


def fold(text: str) -> str:
    """The comparison form of a local part (or of a whole `local@domain`): Unicode
    NFC, lower-cased, and NFC again (lower-casing can denormalise; this way
    `fold(fold(x)) == fold(x)`)."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower())


def address_key(address: Address) -> str:
    """The string a mailbox or alias is stored and looked up under."""
    return f"{fold(address.local)}@{address.domain.lower()}"


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
    local = fold(address.local)
    if not _is_safe_local(local):
        raise InvalidAddress(
            f"{email}: a mailbox local part may only contain letters, digits, . _ + - "
            "and must not start with '.' or contain '..'"
        )
    if address.domain.startswith("["):
        raise InvalidAddress(f"{email}: a mailbox needs a domain name, not an address literal")
    _check_local_domain(email, address.domain, local_domains)
    return Address(local, address.domain)


def alias_source(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate the source of an alias: an address in a local domain, folded."""
    address = _parse(text, "alias")
    local = fold(address.local)
    if local == "postmaster":
        raise InvalidAddress(
            f"{text}: postmaster@ always goes to the configured postmaster; "
            "change `postmaster` in the config instead"
        )
    _check_local_domain(text, address.domain, local_domains)
    return Address(local, address.domain)


def alias_target(text: str, local_domains: Collection[str] | None = None) -> Address:
    """Validate an alias target: any mailbox; folded when it is local.

    A remote local part keeps its case and spelling: only the remote host may
    interpret it.
    """
    address = _parse(text, "target", ascii_domain=False)
    if local_domains is not None and address.domain in local_domains:
        return Address(fold(address.local), address.domain)
    return address


def _parse(text: str, what: str, *, ascii_domain: bool = True) -> Address:
    try:
        address = parse_mailbox(text.strip(), utf8=True)
        if ascii_domain and not address.domain.isascii():
            raise AddressError("invalid domain (use its ASCII form, xn--...)")
        if len(fold(address.local).encode("utf-8")) > MAX_LOCAL_PART:
            raise AddressError("local part too long")
    except AddressError as e:
        raise InvalidAddress(f"{text!r} is not a valid {what} address: {e}") from None
    return address


def _is_safe_local(local: str) -> bool:
    if not local or local[0] == "." or ".." in local:
        return False
    if unicodedata.category(local[0])[0] == "M":  # a mark needs a letter before it
        return False
    for ch in local:
        if ch.isascii():
            if ch not in _SAFE_ASCII:
                return False
        elif unicodedata.category(ch)[0] not in _SAFE_CATEGORIES:
            return False
    return True


def _check_local_domain(text: str, domain: str, local_domains: Collection[str] | None) -> None:
    if local_domains is not None and domain not in local_domains:
        known = ", ".join(local_domains) or "(none)"
        raise InvalidAddress(
            f"{text}: domain {domain!r} is not a local domain (local_domains: {known})"
        )
