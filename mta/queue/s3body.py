"""Bodies of the PostgreSQL queue kept in S3 (``body_ref = 's3'``): `S3Bodies`.

Whenever ``[storage.s3]`` is configured (its endpoint set), the PostgreSQL queue
keeps the bodies of the messages it accepts in that bucket, at
``<prefix>queue/<queue id>`` (under `[storage.s3] prefix`, whatever `[storage]
backend` says), and only their rows in PostgreSQL.  The order makes it durable:
the commit batch PUTs each body first (several single PUTs at once,
`mta.s3.upload.UploadWindow`; a multipart upload above 8 MiB), then commits the
rows in one transaction, and only then does the session answer 250.  A body whose
upload fails is refused with a 451 (the rest of the batch commits); when the
transaction fails, the objects just written are deleted (best effort) and the
whole batch is refused.

A body is read back 1 MiB at a time with ranged GETs (`read`), so delivery holds
no more of it than from ``queue_bodies``.  Its object is deleted after its row is
gone (the entry delivered, bounced or deleted by an operator); a crash in between,
or a failed delete, leaves an orphan, which `sweep` removes: every object under
``<prefix>queue/`` with no row and older than an hour (an upload whose row is
being committed is younger), run at start and then hourly by each node.

Every method blocks (a pool thread, or mta-admin); requests go through `call`
(`mta.s3.reactor.ReactorCaller`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from mta.observe.logging import Logger
from mta.queue.ids import is_queue_id
from mta.s3.client import S3Client
from mta.s3.upload import PART_SIZE, UploadWindow, upload

__all__ = ["ORPHAN_AGE", "S3Bodies"]

_log = Logger()
ORPHAN_AGE = 3600.0
CHUNK = 1024 * 1024  # as mta.queue.pgbody.CHUNK: one ranged GET


class S3Bodies:
    """Bodies in `client`'s bucket under ``<prefix>queue/``."""

    ref = "s3"

    def __init__(
        self,
        client: S3Client,
        call: Callable,
        prefix: str = "",
        *,
        part_size: int = PART_SIZE,
        on_close: Callable[[], None] | None = None,
    ):
        self.client = client
        self.call = call
        self.folder = f"{prefix}queue/"
        self.part_size = part_size
        self._on_close = on_close

    def key(self, qid: str) -> str:
        return self.folder + qid

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()

    def put_all(self, bodies: Sequence[tuple[str, Iterable[bytes], int]]) -> dict[str, Exception]:
        """Store each (queue id, chunks, size); the errors of those that failed."""
        errors: dict[str, Exception] = {}
        window = UploadWindow(self.call)
        for qid, chunks, size in bodies:

            def done(error, qid=qid):
                if error is not None:
                    errors[qid] = error

            try:
                upload(
                    self.call,
                    self.client,
                    self.key(qid),
                    chunks,
                    size,
                    part_size=self.part_size,
                    window=window,
                    done=done,
                )
            except Exception as e:  # noqa: BLE001 (one outcome per body)
                errors[qid] = e
        window.drain()
        return errors

    def read(self, qid: str, seq: int) -> bytes:
        """Chunk `seq` (1 MiB) of the stored body: one ranged GET."""
        return self.call(self.client.get_object, self.key(qid), CHUNK, seq * CHUNK)

    def delete_all(self, qids: Iterable[str]) -> int:
        """Delete the objects of `qids`, several at once; how many went.  A failure
        is logged, never raised: the sweep finds what is left."""
        futures = [
            (qid, self.call.submit(self.client.delete_object, self.key(qid))) for qid in qids
        ]
        deleted = 0
        for qid, future in futures:
            try:
                future.result()
                deleted += 1
            except Exception as e:  # noqa: BLE001
                _log.warn(
                    "cannot delete the queued body {key}: {error} (the hourly sweep will)",
                    key=self.key(qid),
                    error=str(e),
                    event="body_delete_failed",
                )
        return deleted

    def sweep(self, live: Callable[[list[str]], set[str]], now: float) -> int:
        """Delete the objects under ``<prefix>queue/`` older than an hour whose
        queue id `live` (ids -> those with a row) does not know; how many."""
        removed, token = 0, ""
        while True:
            page, token = self.call(self.client.list_page, self.folder, token)
            old = [
                key[len(self.folder) :]
                for key, modified in page
                if modified and modified < now - ORPHAN_AGE
            ]
            old = [qid for qid in old if is_queue_id(qid)]
            if old:
                kept = live(old)
                removed += self.delete_all(q for q in old if q not in kept)
            if not token:
                return removed

    def probe(self) -> str:
        """Readiness: the bucket answers a signed listing now (not retried)."""
        self.call(self.client.check_bucket, 4.0)
        return f"bodies in {self.client.where}/{self.folder}"


def open_s3_bodies(config, reactor=None) -> S3Bodies | None:
    """The `S3Bodies` of ``[storage.s3]`` when it is configured, else None."""
    from mta.s3.settings import open_client, s3_configured

    s3 = config.storage_s3
    if not s3_configured(s3):
        return None
    client, call, stop = open_client(s3, reactor)
    return S3Bodies(client, call, s3.prefix, on_close=stop)
