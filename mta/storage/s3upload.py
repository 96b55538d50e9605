"""Putting one message into S3 from a delivery thread, a part at a time.

The body is read (`IMessageBody.chunks`) and hashed in the calling thread, never on
the reactor; each request then runs on the reactor (`call`, a
`mta.storage.s3reactor.ReactorCaller`) while the thread waits.  A body of at most
`part_size` bytes is one PUT; a bigger one is a multipart upload
(CreateMultipartUpload, UploadPart per `part_size` bytes, CompleteMultipartUpload),
so at most one part is in memory whatever the message's size.  A body that turns
out longer or shorter than recorded, or any failed request, aborts the multipart
upload: nothing half-written is left to be billed or found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

from twisted.logger import Logger

from mta.storage.s3client import S3Client, sha256_hex

__all__ = ["PART_SIZE", "parts_of", "upload"]

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB (except the last)
_READ_SIZE = 1024 * 1024

_log = Logger()


def parts_of(chunks: Iterable[bytes], part_size: int) -> Iterator[bytes]:
    """`chunks` regrouped into parts of `part_size` bytes (the last one shorter)."""
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) >= part_size:
            yield bytes(pending[:part_size])
            del pending[:part_size]
    if pending:
        yield bytes(pending)


def upload(
    call: Callable,
    client: S3Client,
    key: str,
    chunks: Iterable[bytes],
    size: int,
    *,
    part_size: int = PART_SIZE,
) -> bytes:
    """Store the `size` bytes `chunks` gives at `key` (blocking); the first part
    (what the index parses).  Raises OSError when `chunks` is not `size` bytes long,
    `S3Error` when S3 refuses or cannot be reached."""
    parts = parts_of(chunks, part_size)
    try:
        first = next(parts, b"")
        if size <= part_size:
            extra = sum(len(p) for p in parts)
            _check_length(key, len(first) + extra, size)
            call(client.put_object, key, first, sha256_hex(first))
            return first
        upload_id = call(client.create_multipart, key)
        try:
            etags = [call(client.upload_part, key, upload_id, 1, first, sha256_hex(first))]
            done = len(first)
            for number, part in enumerate(parts, start=2):
                done += len(part)
                if done > size:
                    break
                etags.append(
                    call(client.upload_part, key, upload_id, number, part, sha256_hex(part))
                )
            _check_length(key, done, size)
            call(client.complete_multipart, key, upload_id, etags)
        except BaseException:
            _abort(call, client, key, upload_id)
            raise
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
