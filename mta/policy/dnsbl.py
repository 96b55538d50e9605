"""DNS block lists at connect: is the client listed at `[checks] dnsbl` zones?

For a client 192.0.2.99 the check asks for the A record of ``99.2.0.192.<zone>``
(IPv6: the 32 reversed nibbles, as in ip6.arpa) in every block-list zone at once,
through the project's resolver (`mta.dns.make_resolver`, `[dns] nameservers`).  An
answer in 127.0.0.0/8 means listed; NXDOMAIN, no answer, or a failed lookup means
not listed (a broken list never keeps mail out; failures are logged).  Answers in
127.255.255.0/24 are a list's own error codes (e.g. "queries through public
resolvers are refused") and are logged, not taken as listings.

Listed at a zone:

- `action = "reject"`: the greeting is ``554 5.7.1 Service unavailable; client [ip]
  listed at <zone>`` and the session closes;
- `action = "tag"`: the session goes on and each message gets
  ``X-DNSBL: listed at <zone>``.

Clients in `relay_networks` are never looked up, nor clients listed at one of the
`dnswl` (allow-list) zones, which are asked first.  Loopback is looked up like any
other address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from twisted.internet import defer
from twisted.names import dns
from zope.interface import implementer

from mta.dns import describe_failure
from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.verdict import Phase, PolicyContext, Verdict

log = Logger()

_LISTED = ipaddress.ip_network("127.0.0.0/8")
_LIST_ERRORS = ipaddress.ip_network("127.255.255.0/24")


def query_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """``99.2.0.192.zone`` / ``<32 nibbles>.zone`` for `address` at `zone`."""
    reverse = address.reverse_pointer  # ...in-addr.arpa / ...ip6.arpa
    return reverse.rsplit(".", 2)[0] + "." + zone


@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address (an IPv4-mapped IPv6 address as IPv4), None if not one.
    Memoised: every check asks for it at every phase, and a client sends many
    messages (the addresses are immutable)."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@implementer(IPolicyCheck)
class DNSBLCheck:
    """At CONNECT: reject or tag a client listed at a block-list zone."""

    name = "dnsbl"
    phases = (Phase.CONNECT,)

    def __init__(
        self,
        resolver,
        zones: Iterable[str],
        *,
        action: str = "tag",
        allow_zones: Iterable[str] = (),
        relay_networks: Iterable = (),
    ):
        if action not in ("tag", "reject"):
            raise ValueError(f"unknown dnsbl action {action!r}")
        self.resolver = resolver
        self.zones = tuple(z.lower().strip(".") for z in zones)
        self.allow_zones = tuple(z.lower().strip(".") for z in allow_zones)
        self.action = action
        self.relay_networks = tuple(relay_networks)

    def check(self, phase: Phase, context: PolicyContext):
        ip = client_ip(context.client_address)
        if ip is None or not self.zones:
            return Verdict.CONTINUE
        if any(ip.version == net.version and ip in net for net in self.relay_networks):
            return Verdict.CONTINUE
        return defer.Deferred.fromCoroutine(self._check(ip, context))

    async def _check(self, ip, context: PolicyContext) -> Verdict:
        if self.allow_zones:
            allowed = await self.listed_at(ip, self.allow_zones)
            if allowed:
                log.debug(
                    "client {client} allow-listed at {zone}",
                    event="dnswl_listed",
                    client=str(ip),
                    zone=allowed[0],
                    session=context.session_id,
                )
                return Verdict.CONTINUE
        listed = await self.listed_at(ip, self.zones)
        if not listed:
            return Verdict.CONTINUE
        zone = listed[0]
        log.info(
            "client {client} listed at {zones} ({action})",
            event="dnsbl_listed",
            client=str(ip),
            zones=", ".join(listed),
            action=self.action,
            session=context.session_id,
        )
        if self.action == "reject":
            reply = Reply(554, "5.7.1", f"Service unavailable; client [{ip}] listed at {zone}")
            return Verdict.reject(reply)
        return Verdict.continue_(headers=(f"X-DNSBL: listed at {zone}\r\n".encode("ascii"),))

    async def listed_at(self, ip, zones: tuple[str, ...]) -> list[str]:
        """The zones of `zones` that list `ip`, in their order (lookups in parallel)."""
        results = await defer.DeferredList(
            [self._lookup(ip, zone) for zone in zones], consumeErrors=True
        )
        return [zone for zone, (ok, listed) in zip(zones, results) if ok and listed]

    def _lookup(self, ip, zone: str) -> defer.Deferred:
        name = query_name(ip, zone)
        d = self.resolver.lookupAddress(name)
        return d.addCallbacks(
            self._answered, self._failed, callbackArgs=(ip, zone), errbackArgs=(ip, zone)
        )

    @staticmethod
    def _answered(result, ip, zone: str) -> bool:
        answers = result[0]
        for record in answers:
            if record.type != dns.A:
                continue
            address = ipaddress.ip_address(record.payload.dottedQuad())
            if address in _LIST_ERRORS:
                log.warn(
                    "dnsbl {zone} answered {answer} for {client}: an error code, not a listing",
                    event="dnsbl_error",
                    zone=zone,
                    answer=str(address),
                    client=str(ip),
                )
            elif address in _LISTED:
                return True
        return False

    @staticmethod
    def _failed(failure, ip, zone: str) -> bool:
        description = describe_failure(failure)
        if description != "NXDOMAIN":
            log.warn(
                "dnsbl lookup of {client} at {zone} failed: {error}; taken as not listed",
                event="dnsbl_error",
                zone=zone,
                client=str(ip),
                error=description,
            )
        return False
