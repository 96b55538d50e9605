"""The S3 client of ``[storage.s3]``: one construction for the S3 mail store and the
PostgreSQL queue's S3 bodies (`mta.storage.s3store`, `mta.queue.s3body`).

`open_client` builds an `S3Client` from the checked settings (`mta.config.s3`),
reading the secret from its file, and the caller that runs its requests from a
blocking thread: on the server's `reactor` when there is one, else (mta-admin) on
a reactor thread of its own, stopped by the returned `stop`.
"""

from __future__ import annotations

from collections.abc import Callable

from mta.s3.client import S3Client


def s3_configured(s3) -> bool:
    """True when ``[storage.s3]`` names a server (its endpoint is set)."""
    return bool(getattr(s3, "endpoint", ""))


def open_client(s3, reactor=None) -> tuple[S3Client, Callable, Callable[[], None] | None]:
    """(client, call, stop) for the `S3Config` `s3`; `stop` is None with `reactor`."""
    from mta.config.s3 import read_secret
    from mta.s3.reactor import ReactorCaller, ReactorThread

    secret = read_secret(s3.secret_access_key_file)
    stop = None
    if reactor is None:
        own = ReactorThread()
        reactor, call, stop = own.reactor, own.call, own.stop
    else:
        call = ReactorCaller(reactor)
    try:
        client = S3Client(
            reactor,
            s3.endpoint,
            s3.bucket,
            s3.region,
            s3.access_key_id,
            secret,
            timeout=s3.timeout,
            attempts=s3.retries + 1,
        )
    except BaseException:
        if stop is not None:
            stop()
        raise
    return client, call, stop
