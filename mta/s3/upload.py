"""Putting one message into S3 from a delivery thread, a part at a time.

The body is read (`IMessageBody.chunks`) and hashed in the calling thread, never on
the reactor; each request then runs on the reactor (`call`, a
`mta.s3.reactor.ReactorCaller`) while the thread waits.  A body of at most
`part_size` bytes is one PUT; a bigger one is a multipart upload
(CreateMultipartUpload, UploadPart per `part_size` bytes, CompleteMultipartUpload),
so at most one part is in memory whatever the message's size.  A body that turns
out longer or shorter than recorded, or any failed request, aborts the multipart
upload: nothing half-written is left to be billed or found.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable

from twisted.logger import Logger

from mta.fileio import regroup
from mta.s3.client import S3Client, sha256_hex

__all__ = ["PART_SIZE", "UploadWindow", "upload"]

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB (except the last)
_READ_SIZE = 1024 * 1024

_log = Logger()


class UploadWindow:
    """The single PUTs of one delivery batch, several in flight at once: the thread
    reads, hashes and indexes the next message while earlier ones travel.  At most
    `max_count` requests and `max_bytes` of bodies are in flight; each PUT's outcome
    goes to its `done` callback (None or the exception), in the thread, by `drain`
    at the latest."""

    def __init__(self, call, *, max_count: int = 8, max_bytes: int = 2 * PART_SIZE):
        self.call = call  # a ReactorCaller: `submit` starts a request, returns a Future
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._pending: deque = deque()
        self._bytes = 0

    def put(self, client: S3Client, key: str, data: bytes, done: Callable) -> None:
        while self._pending and (
            len(self._pending) >= self.max_count or self._bytes + len(data) > self.max_bytes
        ):
            self._finish_oldest()
        future = self.call.submit(client.put_object, key, data, sha256_hex(data))
        self._pending.append((future, len(data), done))
        self._bytes += len(data)

    def drain(self) -> None:
        while self._pending:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        future, size, done = self._pending.popleft()
        self._bytes -= size
        try:
            future.result()
        except Exception as e:
            done(e)
        else:
            done(None)


def upload(
    call: Callable,
    client: S3Client,
    key: str,
    chunks: Iterable[bytes],
    size: int,
    *,
    part_size: int = PART_SIZE,
    window: UploadWindow | None = None,
    done: Callable | None = None,
) -> bytes:
    """Store the `size` bytes `chunks` gives at `key` (blocking); the first part
    (what the index parses).  Raises OSError when `chunks` is not `size` bytes long,
    `S3Error` when S3 refuses or cannot be reached.  With a `window`, a body of one
    part is only started: `done` gets its outcome later (a multipart upload is
    finished here, and `done` called with None)."""
    parts = regroup(chunks, part_size)
    try:
        first = next(parts, b"")
        if size <= part_size:
            extra = sum(len(p) for p in parts)
            _check_length(key, len(first) + extra, size)
            if window is not None:
                window.put(client, key, first, done)
            else:
                call(client.put_object, key, first, sha256_hex(first))
            return first
        upload_id = call(client.create_multipart, key)
        try:
            etags = [call(client.upload_part, key, upload_id, 1, first, sha256_hex(first))]
            sent = len(first)
            for number, part in enumerate(parts, start=2):
                sent += len(part)
                if sent > size:
                    break
                etags.append(
                    call(client.upload_part, key, upload_id, number, part, sha256_hex(part))
                )
            _check_length(key, sent, size)
            call(client.complete_multipart, key, upload_id, etags)
        except BaseException:
            _abort(call, client, key, upload_id)
            raise
        if done is not None:
            done(None)
        return first
    finally:
        with contextlib.suppress(Exception):
            parts.close()
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _check_length(key: str, got: int, size: int) -> None:
    if got != size:
        raise OSError(f"message body is not as long as recorded ({got} of {size} bytes for {key})")


def _abort(call: Callable, client: S3Client, key: str, upload_id: str) -> None:
    try:
        call(client.abort_multipart, key, upload_id)
    except Exception as e:
        _log.warn(
            "s3: could not abort the multipart upload {upload_id} of {key}: {error}"
            " (a lifecycle rule with AbortIncompleteMultipartUpload cleans it up)",
            upload_id=upload_id,
            key=key,
            error=str(e),
        )
