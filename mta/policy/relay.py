"""The relay rule and recipient resolution: who may send to which recipient.

A recipient in a local domain must resolve to a mailbox (user or alias) or gets
550 5.1.1.  A recipient anywhere else is accepted only from an authenticated client or
a `relay_networks` address; otherwise 550 5.7.1.  The domain is whatever the RFC 5321
parser found after the last unquoted '@' (source routes already dropped), and local
parts are never re-interpreted: `user%other@local`, `other!user@local` and
`"user@other"@local` are unknown local users, never relay requests.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twisted.internet import defer
from zope.interface import implementer

from mta.envelope import Address, Reply
from mta.interfaces import IPolicyCheck
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict

USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")

_USER_UNKNOWN = Verdict.reject(USER_UNKNOWN)
_RELAY_DENIED = Verdict.reject(RELAY_DENIED)


@implementer(IPolicyCheck)
class RelayCheck:
    """Decides each RCPT: an ACCEPT naming the final mailboxes, or a 550.

    Resolution of local mailboxes is delegated to an `IUserDirectory`.  This check is
    what keeps the server from being an open relay: run it fail-closed, always.
    """

    name = "relay"
    phases = (Phase.RCPT,)

    def __init__(self, local_domains: Iterable[str], relay_networks: Iterable, directory):
        self._local_domains = frozenset(d.lower() for d in local_domains)
        self._networks = tuple(relay_networks)
        self._directory = directory
        self._trusted_cache: dict[str, bool] = {}

    def is_local(self, address: Address) -> bool:
        return not address.domain or address.domain in self._local_domains

    def may_relay(self, client_address: str, authenticated_as: str | None = None) -> bool:
        if authenticated_as:
            return True
        trusted = self._trusted_cache.get(client_address)
        if trusted is None:
            try:
                ip = ipaddress.ip_address(client_address)
            except ValueError:
                trusted = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                trusted = any(ip in net for net in self._networks)
            if len(self._trusted_cache) > 10000:
                self._trusted_cache.clear()
            self._trusted_cache[client_address] = trusted
        return trusted

    def check(self, phase: Phase, context: PolicyContext):
        """A `Verdict` for `context.recipient`, or a Deferred firing with one."""
        rcpt = context.recipient
        if not self.is_local(rcpt):
            if self.may_relay(context.client_address, context.authenticated_as):
                return Verdict(Action.ACCEPT, RECIPIENT_OK, (), (rcpt,))
            return _RELAY_DENIED
        result = self._directory.resolve(rcpt)
        if isinstance(result, defer.Deferred):
            return result.addCallback(_verdict)
        return _verdict(result)


def _verdict(mailboxes: tuple[Address, ...]) -> Verdict:
    if not mailboxes:
        return _USER_UNKNOWN
    return Verdict(Action.ACCEPT, RECIPIENT_OK, (), tuple(mailboxes))
