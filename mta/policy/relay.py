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

import attrs
from twisted.internet import defer

from mta.envelope import Address, Reply

USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = Reply(550, "5.7.1", "Relay access denied")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")


@attrs.frozen
class RecipientVerdict:
    """Either a refusal (`reply` is an error) or the final mailboxes to queue."""

    reply: Reply
    recipients: tuple[Address, ...] = ()


@attrs.frozen
class ClientInfo:
    address: str
    authenticated_as: str | None = None


class RelayPolicy:
    """Decides each RCPT; resolution of local mailboxes is delegated to a directory."""

    def __init__(self, local_domains: Iterable[str], relay_networks: Iterable, directory):
        self._local_domains = frozenset(d.lower() for d in local_domains)
        self._networks = tuple(relay_networks)
        self._directory = directory
        self._trusted_cache: dict[str, bool] = {}

    def is_local(self, address: Address) -> bool:
        return not address.domain or address.domain in self._local_domains

    def may_relay(self, client: ClientInfo) -> bool:
        if client.authenticated_as:
            return True
        trusted = self._trusted_cache.get(client.address)
        if trusted is None:
            try:
                ip = ipaddress.ip_address(client.address)
            except ValueError:
                trusted = False
            else:
                if ip.version == 6 and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
                trusted = any(ip in net for net in self._networks)
            if len(self._trusted_cache) > 10000:
                self._trusted_cache.clear()
            self._trusted_cache[client.address] = trusted
        return trusted

    def check_recipient(self, client: ClientInfo, rcpt: Address):
        """A `RecipientVerdict`, or a Deferred firing with one."""
        if not self.is_local(rcpt):
            if self.may_relay(client):
                return RecipientVerdict(RECIPIENT_OK, (rcpt,))
            return RecipientVerdict(RELAY_DENIED)
        result = self._directory.resolve(rcpt)
        if isinstance(result, defer.Deferred):
            return result.addCallback(_verdict)
        return _verdict(result)


def _verdict(mailboxes: tuple[Address, ...]) -> RecipientVerdict:
    if not mailboxes:
        return RecipientVerdict(USER_UNKNOWN)
    return RecipientVerdict(RECIPIENT_OK, tuple(mailboxes))
