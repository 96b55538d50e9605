"""Where mail for a domain goes: MX lookup, implicit MX, null MX, smarthost, host memory.

`MXResolver.resolve(domain)` fires with the ordered list of `Target`s (one per
address of each mail exchanger) that the relay tries in turn, or fails with
`RouteError` carrying the reply every recipient of that domain gets:

- MX records in preference order, hosts of equal preference shuffled (RFC 5321 5.1);
  each host's A then AAAA records;
- no MX records (NODATA) -> the domain itself is the implicit MX (RFC 5321 5.1);
- a null MX ``0 .`` (RFC 7505) -> 556 5.1.10, permanent;
- NXDOMAIN for the domain -> 550 5.1.2, permanent; SERVFAIL, timeout, refusal -> 451
  4.4.3, transient (only an authoritative "no such name" bounces mail);
- MX hosts that all have no address -> 550 5.4.4 when every lookup said so, 451 when
  any was temporary;
- an address literal (``user@[192.0.2.1]``) goes to that address.

`[relay] smarthost` ("host:port") replaces all of this with one fixed next hop.
Addresses that refused a connection are remembered for `unreachable_for` seconds on
the injected clock and skipped (like Exim's retry database): with every target
skipped the domain is deferred without a connection attempt.
"""

from __future__ import annotations

import ipaddress
import random as _random

import attrs
from twisted.internet import defer
from twisted.names import dns as tdns

from mta import dns as mtadns
from mta.envelope import Reply
from mta.observe.logging import Logger

log = Logger()


@attrs.frozen
class Target:
    """One address to connect to; `host` is the MX name (for logs and TLS), or the
    address itself for an address literal (``[192.0.2.1]``) or a smarthost given
    by address."""

    host: str
    address: str
    port: int
    preference: int = 0

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def has_name(self) -> bool:
        """False when `host` is only the address again (a literal or an IP smarthost)."""
        host = self.host.strip("[]")
        if host[:5].lower() == "ipv6:":
            host = host[5:]
        return _ip(host) is None

    @property
    def remote_mta(self) -> str:
        """The peer's name for a DSN's Remote-MTA field: the MX host name, or the
        address when there is no name."""
        return self.host if self.has_name else self.address

    @property
    def peer(self) -> str:
        """How logs and replies name the peer, Postfix-style: ``mx.example[192.0.2.1]``,
        or ``[192.0.2.1]`` (the address once) when there is no name."""
        return f"{self.host}[{self.address}]" if self.has_name else f"[{self.address}]"

    def __str__(self) -> str:
        return f"{self.peer}:{self.port}"


class RouteError(Exception):
    """No target for a domain; `reply` says why and whether it is permanent."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


def parse_host_port(value: str, default_port: int = 25) -> tuple[str, int]:
    """`"host:port"`, `"[v6]:port"`, `"host"` -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if port and not port.isdigit():
        raise ValueError(f"bad host:port {value!r}")
    return host.rstrip(".").lower(), int(port) if port else default_port


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


class MXResolver:
    """Resolves a domain to ordered targets with `resolver` (a twisted.names IResolver)."""

    def __init__(
        self,
        resolver,
        clock,
        *,
        port: int = 25,
        smarthost: str | None = None,
        unreachable_for: float = 300.0,
        random: _random.Random | None = None,
    ):
        self.resolver = resolver
        self.clock = clock
        self.port = port
        self.smarthost = parse_host_port(smarthost, 25) if smarthost else None
        self.unreachable_for = unreachable_for
        self._random = random or _random.Random()
        self._unreachable: dict[tuple[str, int], float] = {}

    # -- host memory ---------------------------------------------------------------

    def mark_unreachable(self, target: Target) -> None:
        """Skip `target`'s address for `unreachable_for` seconds."""
        self._unreachable[target.key] = self.clock.seconds() + self.unreachable_for

    def mark_reachable(self, target: Target) -> None:
        self._unreachable.pop(target.key, None)

    def is_unreachable(self, target: Target) -> bool:
        until = self._unreachable.get(target.key)
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._unreachable[target.key]
            return False
        return True

    # -- lookup --------------------------------------------------------------------

    def resolve(self, domain: str) -> defer.Deferred:
        """Deferred firing with a non-empty list of `Target`, or failing with RouteError."""
        return defer.Deferred.fromCoroutine(self._resolve(domain.rstrip(".").lower()))

    async def _resolve(self, domain: str) -> list[Target]:
        if self.smarthost is not None:
            host, port = self.smarthost
            targets = await self._host_targets(host, port, 0, domain)
        elif domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            targets = [Target(domain, literal, self.port)]
        else:
            targets = await self._mx_targets(domain)
        usable = [t for t in targets if not self.is_unreachable(t)]
        if not usable:
            raise RouteError(
                Reply(451, "4.4.1", f"all mail exchangers for {domain} recently unreachable")
            )
        return usable

    async def _mx_targets(self, domain: str) -> list[Target]:
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(domain)
        except Exception as e:
            raise self._dns_error(domain, "MX", e) from None
        records = [
            rr.payload
            for rr in answers
            if rr.type == tdns.MX and rr.name.name.decode("ascii", "replace").lower() == domain
        ] or [rr.payload for rr in answers if rr.type == tdns.MX]
        if not records:
            # RFC 5321 5.1: no MX -> the domain is its own (implicit) MX.
            targets = await self._host_targets(domain, self.port, 0, domain, implicit=True)
            return targets
        exchanges = [
            (r.preference, r.name.name.decode("ascii", "replace").rstrip(".")) for r in records
        ]
        if any(name == "" for _, name in exchanges):
            # RFC 7505: "0 ." means the domain accepts no mail.
            raise RouteError(
                Reply(556, "5.1.10", f"domain {domain} does not accept mail (null MX)")
            )
        # Preference order; equal preferences in random order (RFC 5321 5.1).
        exchanges = sorted(
            dict.fromkeys((p, n.lower()) for p, n in exchanges),
            key=lambda pn: (pn[0], self._random.random()),
        )
        targets: list[Target] = []
        errors: list[RouteError] = []
        lookups = [self._host_targets(name, self.port, pref, domain) for pref, name in exchanges]
        for coro in lookups:
            try:
                targets.extend(await coro)
            except RouteError as e:
                errors.append(e)
        if targets:
            return targets
        if errors and all(e.permanent for e in errors):
            raise RouteError(Reply(550, "5.4.4", f"no mail exchanger of {domain} has an address"))
        detail = errors[-1].reply.text if errors else "no address"
        raise RouteError(
            Reply(451, "4.4.3", f"cannot resolve mail exchangers of {domain}: {detail}")
        )

    async def _host_targets(
        self, host: str, port: int, preference: int, domain: str, *, implicit: bool = False
    ) -> list[Target]:
        """A then AAAA addresses of `host`; RouteError when it has none."""
        if _ip(host) is not None:
            return [Target(host, host, port, preference)]
        found: list[Target] = []
        failures = []
        for lookup, rtype in (
            (self.resolver.lookupAddress, tdns.A),
            (self.resolver.lookupIPV6Address, tdns.AAAA),
        ):
            try:
                answers, _, _ = await lookup(host)
            except Exception as e:
                failures.append(e)
                continue
            for rr in answers:
                if rr.type == rtype:
                    found.append(
                        Target(
                            host,
                            rr.payload.dottedQuad() if rtype == tdns.A else _aaaa_text(rr.payload),
                            port,
                            preference,
                        )
                    )
        if found:
            return list(dict.fromkeys(found))
        if failures and all(_is_nxdomain(e) for e in failures) or not failures:
            what = "domain" if implicit else "mail exchanger"
            code = (550, "5.1.2") if implicit else (550, "5.4.4")
            raise RouteError(Reply(*code, f"{what} {host} has no address (for {domain})"))
        raise self._dns_error(host, "A/AAAA", next(e for e in failures if not _is_nxdomain(e)))

    def _dns_error(self, name: str, rtype: str, exc: BaseException) -> RouteError:
        failure = _as_failure(exc)
        what = mtadns.describe_failure(failure)
        if mtadns.classify_failure(failure) == mtadns.NOT_FOUND:
            return RouteError(Reply(550, "5.1.2", f"domain {name} not found ({rtype}: {what})"))
        return RouteError(Reply(451, "4.4.3", f"DNS lookup of {name} failed ({rtype}: {what})"))


def _aaaa_text(payload) -> str:
    return str(ipaddress.IPv6Address(payload.address))


def _as_failure(exc: BaseException):
    from twisted.python.failure import Failure

    return Failure(exc)


def _is_nxdomain(exc: BaseException) -> bool:
    return mtadns.classify_failure(_as_failure(exc)) == mtadns.NOT_FOUND
