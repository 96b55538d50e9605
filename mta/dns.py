"""The one DNS configuration every lookup uses: relay MX lookups now, SPF/DKIM/DMARC later.

`[dns] nameservers` ("host:port", tried in order) overrides the system resolver
(/etc/resolv.conf); `[dns] timeout` bounds each query.  Two views of the same
settings are built here so no caller configures DNS on its own:

- `make_resolver(config, reactor)`: a twisted.names `client.Resolver` for code on the
  reactor (natively async, never blocks);
- `make_dnspython_resolver(config)`: a `dns.resolver.Resolver` for libraries that
  only speak dnspython (pyspf, dkimpy); they are blocking and run on a thread pool.

`classify_failure` maps a twisted.names failure to "not found" (permanent) or
"temporary" so that every caller draws the line between 5xx and 4xx the same way.
"""

from __future__ import annotations

import ipaddress

import attrs
from twisted.internet import defer
from twisted.names import client, error

from mta.config import DNSConfig

RESOLV_CONF = "/etc/resolv.conf"


@attrs.frozen
class Nameserver:
    host: str
    port: int = 53


def parse_nameserver(value: str) -> Nameserver:
    """`"127.0.0.1:5353"`, `"[::1]:53"` or a bare address -> a `Nameserver`.

    Raises ValueError naming the value when it is not an IP address (a resolver
    address must not itself need resolving).
    """
    host, port = value, 53
    if value.startswith("["):
        inner, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {value!r}: expected [addr]:port")
        host = inner
        if rest:
            port = _port(rest[1:], value)
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        port = _port(p, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {value!r}: {host!r} is not an IP address") from None
    return Nameserver(host, port)


def _port(text: str, value: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad nameserver {value!r}: bad port {text!r}")
    return int(text)


def nameservers(config: DNSConfig) -> list[Nameserver]:
    return [parse_nameserver(v) for v in config.nameservers]


def make_resolver(config: DNSConfig, reactor) -> client.Resolver:
    """An async resolver: the configured nameservers, or /etc/resolv.conf's."""
    timeout = (max(0.1, float(config.timeout)),)
    servers = nameservers(config)
    if servers:
        return client.Resolver(
            servers=[(s.host, s.port) for s in servers], timeout=timeout, reactor=reactor
        )
    return client.Resolver(resolv=RESOLV_CONF, timeout=timeout, reactor=reactor)


def make_dnspython_resolver(config: DNSConfig):
    """A dnspython `Resolver` with the same servers and timeout (blocking: thread pool)."""
    import dns.resolver

    servers = nameservers(config)
    if not servers:
        resolver = dns.resolver.Resolver(configure=True)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        try:
            import dns.nameserver  # dnspython >= 2.4

            resolver.nameservers = [dns.nameserver.Do53Nameserver(s.host, s.port) for s in servers]
        except ImportError:  # dnspython 2.3 (Debian 12)
            resolver.nameservers = [s.host for s in servers]
            resolver.nameserver_ports = {s.host: s.port for s in servers}
    resolver.timeout = float(config.timeout)
    resolver.lifetime = float(config.timeout) * max(1, len(servers))
    return resolver


# -- failures ----------------------------------------------------------------------

NOT_FOUND = "not found"
TEMPORARY = "temporary"


def classify_failure(failure) -> str:
    """`NOT_FOUND` for NXDOMAIN, `TEMPORARY` for everything else (SERVFAIL, timeout,
    refused, network error): only an authoritative "no such name" is permanent."""
    if failure.check(error.DNSNameError):
        return NOT_FOUND
    return TEMPORARY


def describe_failure(failure) -> str:
    if failure.check(error.DNSNameError):
        return "NXDOMAIN"
    if failure.check(error.DNSServerError):
        return "SERVFAIL"
    if failure.check(error.DNSQueryRefusedError):
        return "REFUSED"
    if failure.check(error.DNSQueryTimeoutError, defer.TimeoutError):
        return "timeout"
    return failure.getErrorMessage() or failure.type.__name__
