"""`[checks]` and `[dkim]`: the checks `mta.config` runs on them (addresses of the
scanning daemons, attachment rules, DNS list zones, DKIM selector and domains, and
what ARC sealing needs)."""

from __future__ import annotations

import contextlib
import re

import attrs

from mta.config.model import ChecksConfig, DKIMConfig
from mta.envelope import AddressError, parse_mailbox


def host_port(value: str, key: str, err) -> tuple[str, int]:
    """(host, port) of a ``host:port`` setting (an empty host is every address)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise err(key, f"expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


_SELECTOR_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def arc_seal(checks: ChecksConfig, dkim: DKIMConfig, err) -> None:
    """ARC sealing needs a key (`[dkim] domains`) and results to seal."""
    if not checks.arc_seal:
        return
    if not dkim.domains:
        raise err("checks.arc_seal", "needs [dkim] domains: the seal is made with the DKIM key")
    if (checks.spf, checks.dkim, checks.dmarc) == ("off", "off", "off"):
        raise err("checks.arc_seal", "needs spf, dkim or dmarc on: it seals their results")


def dkim_section(section: DKIMConfig, err, collect=contextlib.nullcontext) -> DKIMConfig:
    with collect():
        if not _SELECTOR_RE.match(section.selector):
            raise err("dkim.selector", f"not a DNS label: {section.selector!r}")
    domains = []
    for i, domain in enumerate(section.domains):
        domain = domain.lower().rstrip(".")
        with collect():
            try:
                parse_mailbox(f"x@{domain}")
            except AddressError:
                raise err(f"dkim.domains[{i}]", f"not a domain name: {domain!r}") from None
            domains.append(domain)
    return attrs.evolve(section, domains=tuple(dict.fromkeys(domains)))


_ATTACHMENT_RE = re.compile(r"[a-z0-9][a-z0-9_.+-]*(?:/[a-z0-9][a-z0-9.+_-]*)?\Z")


def _checks_lists(section: ChecksConfig, err, collect=contextlib.nullcontext) -> ChecksConfig:
    """Extensions lower-cased without their dot; MIME types lower-cased; DNS list
    zones valid domain names."""
    blocked = []
    for i, value in enumerate(section.blocked_attachments):
        value = value.strip().lower().lstrip(".")
        with collect():
            if not _ATTACHMENT_RE.match(value):
                raise err(
                    f"checks.blocked_attachments[{i}]",
                    f"not a file-name extension or MIME type: {value!r}",
                )
            blocked.append(value)
    zones: dict[str, tuple[str, ...]] = {}
    for key in ("dnsbl", "dnswl"):
        names = []
        for i, zone in enumerate(getattr(section, key)):
            zone = zone.strip().lower().rstrip(".")
            with collect():
                try:
                    parse_mailbox(f"x@{zone}")
                except AddressError:
                    raise err(f"checks.{key}[{i}]", f"not a DNS zone: {zone!r}") from None
                names.append(zone)
        zones[key] = tuple(dict.fromkeys(names))
    return attrs.evolve(section, blocked_attachments=tuple(dict.fromkeys(blocked)), **zones)


def checks_section(section: ChecksConfig, err, collect) -> ChecksConfig:
    """`[checks]`: positive timeout and size; where spamd and clamd listen ("" is off);
    the attachment and DNS-list entries (`_checks_lists`)."""
    with collect():
        if section.timeout <= 0:
            raise err("checks.timeout", "must be a positive number of seconds")
    with collect():
        if section.spam_max_size <= 0:
            raise err("checks.spam_max_size", "must be a positive number of bytes")
    daemons = {}
    for key in ("spamd", "clamd"):
        address = getattr(section, key) or None
        daemons[key] = address
        if address is None or address.startswith("/"):
            continue
        with collect():
            host, _ = host_port(address, f"checks.{key}", err)
            if not address.rpartition(":")[0].strip("[]"):
                raise err(f"checks.{key}", f"expected host:port or a socket path, got {address!r}")
    return _checks_lists(attrs.evolve(section, **daemons), err, collect)
