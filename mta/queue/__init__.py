"""The queue: accepted messages wait here, durably, until delivery is done with them.

`open_queue_store` and `open_queue_control` turn `[queue] backend` into the queue's
two faces (`IQueueStore` for the server, `IQueueControl` for operators); nothing
outside this package knows which backend it is or how it keeps its files.
"""

from __future__ import annotations

BACKENDS = ("local", "postgresql")


class UnknownQueueBackend(ValueError):
    """`[queue] backend` names a queue this build does not have."""


def queue_dsn(config) -> str:
    """The PostgreSQL queue's DSN: `[queue] dsn`, else `[database] dsn`."""
    return config.queue.dsn or config.database.dsn


def _check(config) -> None:
    if config.queue.backend not in BACKENDS:
        raise UnknownQueueBackend(
            f"[queue] backend = {config.queue.backend!r} is not available"
            f" (choose one of {', '.join(BACKENDS)})"
        )


def open_queue_store(config, reactor, threadpool, *, worker: int = 0, **options):
    """The `IQueueStore` of worker process `worker` (the file spool ``queue/`` for the
    first, ``queue/w<k>/`` for the others; or the cluster's PostgreSQL queue)."""
    _check(config)
    if config.queue.backend == "postgresql":
        from mta.queue.pgopen import open_pg_store

        keyring = queue_keyring(config)
        return open_pg_store(
            config, reactor, threadpool, dsn=queue_dsn(config), keyring=keyring, **options
        )
    from mta.queue.filestore import FileQueueStore
    from mta.queue.layout import spool_dir

    if config.queue.encrypt:
        options.setdefault("keyring", queue_keyring(config))
    return FileQueueStore(spool_dir(config.path("queue"), worker), reactor, threadpool, **options)


def queue_keyring(config):
    """The keyring that seals queued messages (``[queue] encrypt``), or None.  The
    spool shares the stores' master keys (``[storage] master_key_file``)."""
    if not config.queue.encrypt:
        return None
    from mta.crypto.keys import open_keyring

    return open_keyring(config)


def open_queue_control(config):
    """The `IQueueControl` for `mta-admin queue ...` and the manhole."""
    _check(config)
    if config.queue.backend == "postgresql":
        from mta.queue.pgcontrol import PGQueueControl
        from mta.queue.pgopen import open_places

        return PGQueueControl(queue_dsn(config), places=open_places(config, queue_keyring(config)))
    from mta.queue.control import FileQueueControl

    return FileQueueControl(config.path("queue"), keyring=queue_keyring(config))


def hold_message(config, envelope, message: bytes, trace_headers: bytes = b"") -> str:
    """Put `message` into the queue on hold (release it with the queue control's
    ``release``); its queue id.  For `mta-admin quarantine release`."""
    _check(config)
    if config.queue.backend == "postgresql":
        from mta.queue.pgcontrol import hold_message as hold_in_pg
        from mta.queue.pgopen import open_places

        places = open_places(config, queue_keyring(config))
        try:
            return hold_in_pg(queue_dsn(config), envelope, message, trace_headers, places)
        finally:
            places.close()
    from mta.queue.inject import hold_message as hold

    return hold(config.path("queue"), envelope, message, trace_headers, queue_keyring(config))


def adopt_orphaned_queues(config) -> int:
    """Before any worker starts: take over what workers that no longer exist left."""
    _check(config)
    if config.queue.backend == "postgresql":
        return 0  # shared: nothing is left behind that another node cannot claim
    from mta.queue.recovery import adopt_orphaned_spools

    return adopt_orphaned_spools(config.path("queue"), config.workers)


def rekey_queue(config, keyring, key_id: str, *, dry_run: bool = False) -> tuple[int, int]:
    """For `mta-admin key retire`: re-wrap the queue's resting sealed entries under
    the current key; (how many, how many active ones still use `key_id`).  The
    PostgreSQL queue re-wraps every entry, active ones too (`mta.queue.pgseal`)."""
    _check(config)
    if config.queue.backend == "postgresql":
        from mta.queue.pgconn import Connections
        from mta.queue.pgseal import rekey as rekey_pg

        connections = Connections(queue_dsn(config), size=1)
        try:
            return connections.run(rekey_pg, keyring, key_id, dry_run), 0
        finally:
            connections.close()
    from mta.queue.rekey import rekey_queue as rekey

    return rekey(config.path("queue"), keyring, key_id, dry_run=dry_run)
