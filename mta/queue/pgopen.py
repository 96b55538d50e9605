"""Opening the PostgreSQL queue from the configuration: the store and its `Places`.

Where bodies go follows the configuration (`mta.queue.pgbody`): S3 whenever
``[storage.s3]`` is configured (`mta.queue.s3body`), else ``queue_bodies``; sealed
when ``[queue] encrypt`` is on (`mta.queue.pgseal`).  The server, `mta-admin
queue` and `mta-admin quarantine release` all open their places here, so they
agree.
"""

from __future__ import annotations

from mta.observe.logging import Logger
from mta.queue.pgbody import Places
from mta.queue.pgconn import Connections, apply_queue_schema

log = Logger()


def open_places(config, keyring=None, reactor=None) -> Places:
    """The `Places` of `config`, sealing with `keyring` (`mta.queue.queue_keyring`);
    S3 requests on `reactor` (None: a reactor thread of their own, stopped by
    `Places.close`)."""
    from mta.queue.s3body import open_s3_bodies

    return Places(open_s3_bodies(config, reactor), keyring)


def open_pg_store(
    config, reactor, threadpool, *, dsn: str, lanes: int = 1, keyring=None, **options
):
    """The store for `[queue] backend = "postgresql"` (`mta.queue.open_queue_store`)."""
    from mta.queue.pgstore import PGQueueStore

    # Commits, claims and records (spool pool) and body reads (delivery pool) share
    # these; the LISTEN connection is apart.
    connections = Connections(dsn, size=2 * lanes + 6)
    try:
        # TEMPORARY (until the migration runner lands): create the tables before any
        # listener accepts.  PostgreSQL down at start is no reason not to start:
        # commits answer 451 and `recover` tries again.
        connections.run(apply_queue_schema)
    except Exception as e:
        log.warn("PostgreSQL queue not ready at start: {error}", error=str(e))
    options.setdefault("places", open_places(config, keyring, reactor))
    return PGQueueStore(
        connections,
        reactor,
        threadpool,
        spill_dir=config.path("queue", "pg-spill"),
        hostname=config.hostname,
        lease=config.queue.lease,
        lanes=lanes,
        **options,
    )
