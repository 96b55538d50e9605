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
    "open_keyring",
    "open_store",
    "safe_component",
]

BACKENDS = ("maildir", "mbox", "timeseries", "sql", "s3")


class UnknownBackend(ValueError):
    """`[storage] backend` names a store this build does not have."""


def open_store(config, *, fsync=None, reactor=None):
    """The `IMailStore` that `config`'s ``[storage]`` asks for: the backend's store,
    or a `RoutingStore` when ``[storage."<domain>"]`` tables send domains elsewhere;
    with ``encrypt = true`` each backend's store is wrapped in an `EncryptingStore`
    (the S3 store seals its shared objects itself).  `reactor`: the running reactor
    the S3 store sends its requests on (None: one of its own, in a thread)."""
    keyring = None
    if config.storage.encrypt:
        from mta.storage.crypto import FileKeyring

        keyring = open_keyring(config, FileKeyring)
    return _open_routed(config, fsync, keyring, reactor)


def open_keyring(config, keyring_class=None):
    """The `mta.crypto.keys.FileKeyring` of ``[storage]``'s key source; raises
    `mta.crypto.keys.KeyringError` saying which file is missing or bad."""
    from mta.crypto.keys import open_keyring as open_ring

    return open_ring(config, keyring_class)


def _open_routed(config, fsync, keyring=None, reactor=None):
    default = _open_sealed(config, config.storage.backend, fsync, keyring, reactor)
    per_domain = getattr(config, "storage_domains", ())
    if not per_domain:
        return default
    from mta.storage.routing import RoutingStore

    stores = {config.storage.backend: default}
    for _, backend in per_domain:
        if backend not in stores:
            stores[backend] = _open_sealed(config, backend, fsync, keyring, reactor)
    return RoutingStore(default, {domain: stores[backend] for domain, backend in per_domain})


def _open_sealed(config, backend: str, fsync, keyring, reactor):
    if backend == "s3":
        from mta.storage.s3store import open_s3_store

        return open_s3_store(config, keyring=keyring, reactor=reactor)
    store = _open_backend(config, backend, fsync)
    if keyring is None:
        return store
    from mta.storage.encrypted import EncryptingStore

    return EncryptingStore(store, keyring)


def _open_backend(config, backend: str, fsync):
    if backend == "maildir":
        from mta.storage.maildir import MaildirStore

        kwargs = {} if fsync is None else {"fsync": fsync}
        return MaildirStore(config.path("mail"), config.hostname, **kwargs)
    if backend == "mbox":
        from mta.storage.mbox import MboxStore

        kwargs = {} if fsync is None else {"fsync": fsync}
        return MboxStore(config.path("mail"), **kwargs)
    if backend == "timeseries":
        from mta.storage.timeseries import ArchiveStore

        # has_delivered looks back as far as a message can stay queued, plus slack.
        days = int(config.queue.max_age // 86400) + 2
        kwargs = {} if fsync is None else {"fsync": fsync}
        return ArchiveStore(config.path("archive"), lookback_days=days, **kwargs)
    if backend in ("sql", "sqlite"):  # "sqlite": the spelling of earlier configs
        from mta.db.location import auto_migrate, database_location
        from mta.storage.sql import SQLStore

        return SQLStore(database_location(config), migrate=auto_migrate(config))
    raise UnknownBackend(
        f"[storage] backend = {backend!r} is not available (choose one of {', '.join(BACKENDS)})"
    )
