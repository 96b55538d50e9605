"""An S3 client on the Twisted reactor: requests signed with botocore, sent by Twisted's
HTTP/1.1 Agent on a persistent connection pool (the answer read with treq).

txaws is Python-2-only, and boto3 blocks; so requests are signed with botocore's
SigV4 signer (`S3SigV4Auth` over an `AWSRequest`) and sent path-style
(``<endpoint>/<bucket>/<key>``), which every S3-compatible server understands.
botocore is imported on first use: a server without S3 never loads it.

The signer hashes the payload; callers that already know the SHA-256 of a body
(computed in a thread, next to where it was read) pass it as `payload_sha256`, so
nothing is hashed on the reactor.

Every request is retried with exponential backoff (``backoff * 2**n`` seconds, at
most `max_backoff`, waited on the injected `clock`) when the server answers 5xx
(or 429), when the connection fails, or when no answer comes within `timeout`
seconds; any other answer (403 SignatureDoesNotMatch, 404 NoSuchBucket, ...) is
final.  A request that fails raises `S3Error`, an OSError whose message names the
endpoint and bucket and says what went wrong, so local delivery turns it into a
temporary failure: the message stays queued.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from urllib.parse import quote
from xml.etree import ElementTree

import attrs
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.web import client as web_client
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

_log = Logger()

__all__ = ["EMPTY_SHA256", "S3Client", "S3Error", "S3Response", "sha256_hex"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_RETRY_STATUS = frozenset((429, 500, 502, 503, 504))
# What a request that never got an answer raises (anything else is a bug: not retried).
_NETWORK_ERRORS = (
    OSError,  # socket errors, DNS
    error.ConnectError,
    error.ConnectionLost,
    error.TimeoutError,
    defer.TimeoutError,
    defer.CancelledError,
    web_client.ResponseNeverReceived,
    web_client.ResponseFailed,
    web_client.RequestTransmissionFailed,
)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3Error(OSError):
    """A request the S3 server refused or never answered.  `status` is the HTTP
    status (None: no answer), `code` the S3 error code (``SignatureDoesNotMatch``)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code


@attrs.frozen
class S3Response:
    code: int
    headers: Mapping[str, str]  # lower-case names, first value
    body: bytes


@functools.cache
def _signer_class():
    from botocore.auth import S3SigV4Auth

    class PrehashedS3SigV4Auth(S3SigV4Auth):
        """S3SigV4Auth that takes the payload's SHA-256 from the request context
        when the caller computed it (so the body is not hashed again here)."""

        def payload(self, request):
            return request.context.get("payload_sha256") or super().payload(request)

    return PrehashedS3SigV4Auth


class _QuietFactory(web_client._HTTP11ClientFactory):
    noisy = False


def _agent(reactor, connect_timeout: float):
    pool = web_client.HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory  # no "Starting factory" line per connection
    pool.maxPersistentPerHost = 8
    pool.retryAutomatically = False  # we retry, with backoff, ourselves
    return web_client.Agent(reactor, connectTimeout=connect_timeout, pool=pool), pool


class S3Client:
    """Requests to one bucket of an S3-compatible server at `endpoint`
    (``http(s)://host[:port]``), signed for `region`."""

    def __init__(
        self,
        reactor,
        endpoint: str,
        bucket: str,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        *,
        clock=None,
        timeout: float = 30.0,
        attempts: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        on_retry=None,
    ):
        from botocore.credentials import Credentials

        self.reactor = reactor
        self.clock = reactor if clock is None else clock
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.where = f"{self.endpoint}/{bucket}"
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.on_retry = on_retry  # called (attempt, delay, S3Error) once a retry is set
        self._signer = _signer_class()(Credentials(access_key_id, secret_access_key), "s3", region)
        self._agent, self._pool = _agent(reactor, timeout)

    def close(self) -> defer.Deferred:
        """Close idle connections (Deferred)."""
        return self._pool.closeCachedConnections()

    def url(self, key: str = "", query: str = "") -> str:
        path = f"/{quote(self.bucket, safe='')}"
        if key:
            path += "/" + quote(key, safe="/~")
        return self.endpoint + path + (f"?{query}" if query else "")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (1, 2, ...)."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))

    # -- requests -------------------------------------------------------------------

    async def request(
        self,
        method: str,
        key: str = "",
        *,
        query: str = "",
        body: bytes = b"",
        payload_sha256: str | None = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200,),
        attempts: int | None = None,
        timeout: float | None = None,
    ) -> S3Response:
        """Send one request (retrying as the module says); the response when its
        status is in `ok`, else `S3Error`."""
        url = self.url(key, query)
        what = f"{method} {key or self.bucket}"
        if payload_sha256 is None:
            payload_sha256 = sha256_hex(body) if body else EMPTY_SHA256
        attempts = self.attempts if attempts is None else max(1, attempts)
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(1, attempts + 1):
            try:
                response = await self._once(method, url, body, payload_sha256, headers, timeout)
            except _NETWORK_ERRORS as e:  # refused, reset, no answer in time, ...
                failure = S3Error(f"s3: {self.where} unreachable: {_reason(e, timeout)}")
                cause: BaseException | None = e
            else:
                if response.code in ok:
                    return response
                failure, cause = self._refused(what, response), None
                if response.code not in _RETRY_STATUS:
                    raise failure
            if attempt == attempts:
                if attempts > 1:
                    failure = S3Error(
                        f"{failure} (after {attempts} attempts)",
                        status=failure.status,
                        code=failure.code,
                    )
                raise failure from cause
            delay = self.delay(attempt)
            wait = task.deferLater(self.clock, delay, lambda: None)
            _log.warn(
                "{error}; retry {attempt} in {delay}s",
                error=str(failure),
                attempt=attempt,
                delay=delay,
            )
            if self.on_retry is not None:
                self.on_retry(attempt, delay, failure)
            await wait
        raise AssertionError("unreachable")

    async def _once(self, method, url, body, payload_sha256, headers, timeout) -> S3Response:
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, data=b"", headers=dict(headers or {}))
        request.context["payload_sha256"] = payload_sha256
        self._signer.add_auth(request)
        signed = {
            name.encode("latin-1"): [value.encode("latin-1")]
            for name, value in request.headers.items()
        }
        d = defer.ensureDeferred(self._send(method, url, signed, body))
        d.addTimeout(timeout, self.clock)
        return await d

    async def _send(self, method, url, headers, body) -> S3Response:
        """One exchange on a pooled connection.  Twisted's Agent directly: treq's
        request wrappers (a cookie jar, a redirect follower and a gzip decoder,
        built anew for every request, and the URL re-parsed and IDNA-encoded) were a
        tenth of the server's time when delivering into S3, and S3 needs none of
        them (a redirect to another region is an error to report, not to follow)."""
        import treq

        data = _BytesProducer(body) if body else None
        response = await self._agent.request(
            method.encode("ascii"), url.encode("ascii"), Headers(headers), data
        )
        content = await treq.content(response)
        found = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        return S3Response(response.code, found, content)

    def _refused(self, what: str, response: S3Response) -> S3Error:
        code, message = _error_of(response.body)
        text = f"s3: {self.where} refused {what}: {response.code}"
        if code:
            text += f" {code}"
        if message:
            text += f": {message}"
        if response.code == 403:
            text += " (check [storage.s3] access_key_id, secret_access_key_file and region)"
        elif code == "NoSuchBucket":
            text += f" (create the bucket {self.bucket!r} first)"
        return S3Error(text, status=response.code, code=code)

    # -- operations -----------------------------------------------------------------

    async def put_object(self, key: str, body: bytes, payload_sha256: str | None = None) -> None:
        headers = {"Content-Type": "message/rfc822"}
        await self.request("PUT", key, body=body, payload_sha256=payload_sha256, headers=headers)

    async def get_object(self, key: str, first: int | None = None, offset: int = 0) -> bytes:
        """The object's bytes (`first` bytes from `offset` only, when given: a ranged
        GET); `S3Error` with status 404 when there is none."""
        if first is None and not offset:
            return (await self.request("GET", key)).body
        end = "" if first is None else str(offset + first - 1)
        headers = {"Range": f"bytes={offset}-{end}"}
        response = await self.request("GET", key, headers=headers, ok=(200, 206, 416))
        if response.code == 416:  # nothing at or after `offset`
            return b""
        body = response.body[offset:] if response.code == 200 else response.body
        return body if first is None else body[:first]

    async def delete_object(self, key: str) -> None:
        await self.request("DELETE", key, ok=(200, 204))

    async def check_bucket(self, timeout: float | None = None) -> None:
        """One listing request, not retried (readiness probes say how it is now)."""
        await self.request("GET", query="list-type=2&max-keys=1", attempts=1, timeout=timeout)

    async def create_bucket(self) -> None:
        await self.request("PUT")

    async def list_keys(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (the first 1000; for tests and operators)."""
        response = await self.request("GET", query=f"list-type=2&prefix={quote(prefix, safe='')}")
        return [e.text or "" for e in _xml(response.body).iter() if _local(e.tag) == "Key"]

    async def list_page(self, prefix: str, token: str = "") -> tuple[list[tuple[str, float]], str]:
        """One page of the keys under `prefix` with their LastModified (epoch
        seconds), and the continuation token of the next page ("" at the end)."""
        query = f"list-type=2&prefix={quote(prefix, safe='')}"
        if token:
            query += f"&continuation-token={quote(token, safe='')}"
        root = _xml((await self.request("GET", query=query)).body)
        found = []
        for element in root.iter():
            if _local(element.tag) == "Contents":
                key, modified = _text(element, "Key"), _text(element, "LastModified")
                found.append((key, _epoch(modified)))
        more = _text(root, "IsTruncated").lower() == "true"
        return found, _text(root, "NextContinuationToken") if more else ""

    async def create_multipart(self, key: str) -> str:
        response = await self.request(
            "POST", key, query="uploads=", headers={"Content-Type": "message/rfc822"}
        )
        upload_id = _text(_xml(response.body), "UploadId")
        if not upload_id:
            raise S3Error(f"s3: {self.where} gave no UploadId for {key}")
        return upload_id

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: bytes, payload_sha256: str
    ) -> str:
        """Upload part `number` (1-based); its ETag."""
        query = f"partNumber={number}&uploadId={quote(upload_id, safe='')}"
        response = await self.request(
            "PUT", key, query=query, body=body, payload_sha256=payload_sha256
        )
        etag = response.headers.get("etag", "")
        if not etag:
            raise S3Error(f"s3: {self.where} gave no ETag for part {number} of {key}")
        return etag

    async def complete_multipart(self, key: str, upload_id: str, etags: Sequence[str]) -> None:
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{_escape(etag)}</ETag></Part>"
            for n, etag in enumerate(etags, start=1)
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        response = await self.request(
            "POST", key, query=f"uploadId={quote(upload_id, safe='')}", body=body
        )
        # S3 may answer 200 and still fail the completion (an <Error> body).
        root = _xml(response.body)
        if _local(root.tag) == "Error":
            raise S3Error(
                f"s3: {self.where} could not complete {key}: {_text(root, 'Code')}"
                f" {_text(root, 'Message')}".rstrip(),
                status=response.code,
                code=_text(root, "Code"),
            )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self.request(
            "DELETE", key, query=f"uploadId={quote(upload_id, safe='')}", ok=(200, 204, 404)
        )


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written in one go.  (A FileBodyProducer's
    default Cooperator runs on the global reactor: a client on a reactor of its own
    would never send the body.)"""

    def __init__(self, data: bytes):
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _reason(e: Exception, timeout: float) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, defer.TimeoutError | error.TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(e, error.DNSLookupError):
        return "cannot resolve the host name"
    if isinstance(e, web_client.ResponseNeverReceived | web_client.ResponseFailed):
        if any(r.check(defer.CancelledError) for r in e.reasons):
            return f"no answer within {timeout:g}s"
        return "the connection was lost before an answer"
    return str(e) or type(e).__name__


def _xml(body: bytes):
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return ElementTree.Element("Unparsable")


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _text(root, name: str) -> str:
    for element in root.iter():
        if _local(element.tag) == name:
            return (element.text or "").strip()
    return ""


def _error_of(body: bytes) -> tuple[str, str]:
    if not body:
        return "", ""
    root = _xml(body)
    return _text(root, "Code"), _text(root, "Message")


def _epoch(stamp: str) -> float:
    """An S3 time (``2026-12-04T17:11:42.000Z``) as epoch seconds; 0 if unreadable."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
