"""Mail stores behind one interface (`mta.interfaces.IMailStore`).

`open_store(config)` is the one place that turns `[storage] backend` into a store;
local delivery, the health probe and `mta-admin` receive what it returns and use
nothing but the interface.  The value types every backend shares live here too.
"""

from __future__ import annotations

from mta.storage.items import StoredMessage, StoreItem
from mta.storage.names import UnsafeMailboxName, safe_component

__all__ = [
    "BACKENDS",
    "StoreItem",
    "StoredMessage",
    "UnsafeMailboxName",
    "UnknownBackend",
    "open_store",
    "safe_component",
]

BACKENDS = ("maildir", "sql")


class UnknownBackend(ValueError):
    """`[storage] backend` names a store this build does not have."""


def open_store(config, *, fsync=None):
    """The `IMailStore` that `config`'s ``[storage]`` asks for."""
    backend = config.storage.backend
    if backend == "maildir":
        from mta.storage.maildir import MaildirStore

        kwargs = {} if fsync is None else {"fsync": fsync}
        return MaildirStore(config.path("mail"), config.hostname, **kwargs)
    if backend in ("sql", "sqlite"):  # "sqlite": the spelling of earlier configs
        from mta.storage.sql import SQLStore

        return SQLStore(config.path("mta.db"))
    raise UnknownBackend(
        f"[storage] backend = {backend!r} is not available (choose one of {', '.join(BACKENDS)})"
    )
