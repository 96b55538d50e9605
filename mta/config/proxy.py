"""`[limits] proxy_networks` and `proxy_timeout`, checked together with the listeners
that take `proxy_protocol = true`: a PROXY header is trusted only from these
networks, so a proxy listener without any would refuse every connection."""

from __future__ import annotations

import ipaddress

import attrs

from mta.config.model import LimitsConfig, ListenerConfig


def proxy_limits(
    limits: LimitsConfig, listeners: tuple[ListenerConfig, ...], err, collect
) -> LimitsConfig:
    """`limits` with `proxy_networks` parsed into networks; errors name the key."""
    networks = []
    for i, value in enumerate(limits.proxy_networks):
        with collect():
            try:
                networks.append(ipaddress.ip_network(str(value), strict=False))
            except ValueError as e:
                raise err(f"limits.proxy_networks[{i}]", f"not a CIDR: {e}") from None
    with collect():
        if limits.proxy_timeout <= 0:
            raise err("limits.proxy_timeout", "must be a positive number of seconds")
    if not limits.proxy_networks:
        for i, listener in enumerate(listeners):
            with collect():
                if listener.proxy_protocol:
                    raise err(
                        f"listener[{i}].proxy_protocol",
                        "needs [limits] proxy_networks: the load balancers' addresses"
                        " (a PROXY header from anywhere else is refused)",
                    )
    return attrs.evolve(limits, proxy_networks=tuple(dict.fromkeys(networks)))
