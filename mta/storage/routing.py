"""`RoutingStore`: one `IMailStore` made of several, chosen by the mailbox's domain.

`[storage] backend` is the default; a ``[storage."<domain>"]`` table with its own
``backend`` sends that local domain's mailboxes to another store.  Every method
goes to the store of its mailbox's domain; `deliver_batch` hands each store its
part of the batch in one call and gives the outcomes back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from zope.interface import implementer

from mta.interfaces import IMailStore

__all__ = ["RoutingStore"]


@implementer(IMailStore)
class RoutingStore:
    """`default` for every domain but those in `by_domain` (lower-case domain names)."""

    def __init__(self, default, by_domain: Mapping[str, object]):
        self.default = default
        self.by_domain = {d.lower().rstrip("."): s for d, s in by_domain.items()}
        self.name = default.name

    def store_for(self, mailbox):
        return self.by_domain.get(mailbox.domain.lower().rstrip("."), self.default)

    def _stores(self) -> list:
        out = [self.default]
        for store in self.by_domain.values():
            if all(store is not s for s in out):
                out.append(store)
        return out

    def deliver_batch(self, items: Sequence) -> list:
        results: list = [None] * len(items)
        groups: dict[int, tuple[object, list[int]]] = {}
        for i, item in enumerate(items):
            try:
                store = self.store_for(item.mailbox)
            except Exception as e:  # a mailbox without a usable domain
                results[i] = e
                continue
            groups.setdefault(id(store), (store, []))[1].append(i)
        for store, indexes in groups.values():
            try:
                outcomes = store.deliver_batch([items[i] for i in indexes])
            except Exception as e:  # a store broke its promise not to raise
                outcomes = [e] * len(indexes)
            for i, outcome in zip(indexes, outcomes):
                results[i] = outcome
        return results

    def has_delivered(self, mailbox, message_tag: str) -> bool:
        return self.store_for(mailbox).has_delivered(mailbox, message_tag)

    def delivered_tags(self, mailbox):
        """The tags in `mailbox` when its store can list them (else None)."""
        tags_of = getattr(self.store_for(mailbox), "delivered_tags", None)
        return None if tags_of is None else tags_of(mailbox)

    def create_mailbox(self, mailbox) -> str | None:
        return self.store_for(mailbox).create_mailbox(mailbox)

    def remove_mailbox(self, mailbox) -> bool:
        return self.store_for(mailbox).remove_mailbox(mailbox)

    def probe(self) -> str:
        return "; ".join(f"{s.name}: {s.probe()}" for s in self._stores())

    def list_messages(self, mailbox) -> list:
        return self.store_for(mailbox).list_messages(mailbox)

    def read_message(self, mailbox, message_id: str) -> bytes:
        return self.store_for(mailbox).read_message(mailbox, message_id)

    def delete_message(self, mailbox, message_id: str) -> None:
        self.store_for(mailbox).delete_message(mailbox, message_id)
