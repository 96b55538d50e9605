"""Mailbox names that become path components, made safe (every file-based store)."""

from __future__ import annotations

import re
import unicodedata

_UNSAFE_RE = re.compile(r"[/\x00-\x1f\x7f]")


class UnsafeMailboxName(ValueError):
    """A domain or local part that cannot safely name a file or directory (permanent)."""


def safe_component(value: str, what: str) -> str:
    """`value` lower-cased and NFC-normalised, or UnsafeMailboxName: no ``/``, NUL or
    control characters, not empty, no leading ``.`` (so never ``.`` or ``..``), at
    most 255 bytes."""
    if value.isascii():
        value = value.lower()
    else:  # lower-casing can denormalise: NFC again after it (as mta.db.fold does)
        value = unicodedata.normalize("NFC", unicodedata.normalize("NFC", value).lower())
    if (
        not value
        or value.startswith(".")
        or _UNSAFE_RE.search(value)
        or len(value.encode("utf-8", "surrogateescape")) > 255
    ):
        raise UnsafeMailboxName(f"unsafe {what} for a mailbox path: {value!r}")
    return value


def mailbox_location(root: str, mailbox, suffix: str = "") -> str:
    """`<root>/<domain>/<local><suffix>` for `mailbox`, both names made safe."""
    domain = safe_component(mailbox.domain, "domain")
    local = safe_component(mailbox.local, "local part")
    return f"{root}/{domain}/{local}{suffix}"
