"""One message body on its way into the spool, and what happens after its last byte.

`IncomingMessage` owns the spool file of one transaction while DATA or BDAT streams:
the size limit (the file is dropped as soon as the message is too big, the rest is
only counted), the header scan for submission fix-ups and loop detection, and the
DATA / BDAT decoders.  At the end, `refusal` says whether the message itself is
unacceptable (too big, bare line endings, too many hops), and `finish` applies the
end-of-message policy verdict and commits:

- REJECT / TEMPFAIL: the spool file is aborted and the verdict's reply is the answer;
- DISCARD: aborted too, logged, and answered with a normal 250;
- QUARANTINE: the envelope carries the reason (`Envelope.quarantine`);
- header fields the checks added go in front of the trace headers;
- 250 only once the spool says the message is durable.
"""

from __future__ import annotations

import errno

import attrs
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mta.envelope import Envelope, Reply
from mta.observe.logging import Logger
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.smtp import replies as R
from mta.smtp.datastream import ChunkChecker, DotDecoder
from mta.smtp.fixups import HeaderScanner, missing_headers
from mta.smtp.received import protocol_name, received_header

log = Logger()


def end_of_message(tx, envelope: Envelope, context, ctx, earlier, esmtp, tls_active, session):
    """The last byte of `tx`'s message arrived: refuse it, or run the end-of-message
    checks (with the `earlier` phases' accepting verdicts folded in) and commit.

    `envelope` is what the spool gets; `context` the session's `PolicyContext` for
    this transaction when there are end-of-message checks (else None); `ctx` its
    `SessionContext`; `esmtp`, `tls_active` and `session` (its id) describe the
    session for the Received header and the logs.  Returns the reply, or a Deferred
    firing with it.
    """
    message = tx.message
    refusal = message.refusal(ctx.config.limits.max_received_headers, envelope.client_address)
    if refusal is not None:
        message.abort()
        return refusal
    qid = message.qid
    originals = envelope.original_recipients
    trace = received_header(
        helo=envelope.helo,
        client_ip=envelope.client_address,
        hostname=ctx.hostname,
        protocol=protocol_name(
            esmtp=esmtp,
            tls=tls_active,
            auth=bool(envelope.authenticated_as),
            utf8=envelope.smtputf8,
        ),
        queue_id=qid,
        recipient=str(originals[0]) if len(originals) == 1 else None,
        tls=envelope.tls,
        now=envelope.received_at,
    )
    if envelope.authenticated_as:
        # RFC 6409 8: a submission server completes what the client left out.
        trace += missing_headers(
            message.headers, queue_id=qid, hostname=ctx.hostname, now=envelope.received_at
        )
    if earlier or context is not None:
        verdict = _data_verdict(message, context, ctx.pipeline, earlier)
        if verdict is None:
            message.abort()
            return write_failed(Failure(), qid)
        return message.finish(verdict, envelope, trace, ctx, session, tx.started_at)
    return message._commit(envelope, trace, ctx, session, tx.started_at)


def _data_verdict(message, context: PolicyContext | None, pipeline, earlier):
    """The end-of-message verdict (or a Deferred) with what earlier phases said
    folded in; None when the body cannot be read back (a spool write error)."""
    for verdict in earlier:
        if verdict.action is Action.DISCARD:
            return verdict  # no point checking a message that will be dropped
    if context is not None:
        try:
            body = message.body()
        except OSError:
            return None
        context = context._replace(queue_id=message.qid, size=message.size, body=body)
        verdict = pipeline.run(Phase.DATA, context)
    else:
        verdict = Verdict.ACCEPT
    if not earlier:
        return verdict
    if isinstance(verdict, defer.Deferred):
        return verdict.addCallback(with_earlier, earlier)
    return with_earlier(verdict, earlier)


class IncomingMessage:
    """The spool file of one transaction and what is known about its body so far."""

    __slots__ = (
        "qid",
        "spoolfile",
        "size",
        "too_big",
        "headers",
        "decoder",
        "checker",
        "received",
        "_max_size",
    )

    def __init__(self, spool, max_size: int, *, bdat: bool = False, normalize: bool = True):
        self.qid = spool.new_queue_id()
        self.spoolfile = spool.open(self.qid)
        self.size = 0
        self.too_big = False
        self.headers = HeaderScanner()
        self.decoder = None if bdat else DotDecoder(normalize)
        self.checker = ChunkChecker(normalize) if bdat else None
        self.received = 0  # BDAT octets received (before any normalising)
        self._max_size = max_size

    def feed_data(self, data: bytes) -> bytes | None:
        """Raw DATA bytes; once the terminating dot was seen, the bytes after it."""
        body, rest = self.decoder.feed(data)
        if body:
            self.write(body)
        return rest

    def feed_chunk(self, chunk: bytes) -> None:
        """One piece of a BDAT chunk (no unstuffing; bare line endings tracked)."""
        self.received += len(chunk)
        data = self.checker.feed(chunk)
        if data:
            self.write(data)

    def last_chunk_done(self) -> None:
        """BDAT LAST has been read: settle a CR the checker was holding back."""
        data = self.checker.finish()
        if data:
            self.write(data)

    def write(self, data: bytes) -> None:
        """Body bytes (dot-unstuffed): counted always, stored while under the limit."""
        if not self.headers.done:
            self.headers.feed(data)
        self.size += len(data)
        if self.too_big:
            return
        if self.size > self._max_size:
            self.too_big = True
            self.abort()
            return
        self.spoolfile.write(data)

    def abort(self) -> None:
        """Drop the spool file (idempotent; a no-op once committed)."""
        spoolfile, self.spoolfile = self.spoolfile, None
        if spoolfile is not None:
            try:
                spoolfile.abort()
            except Exception:
                log.failure("aborting spool file {qid}", qid=self.qid)

    @property
    def bare_line_endings(self) -> bool:
        decoder = self.decoder if self.decoder is not None else self.checker
        return decoder.bare_line_endings

    def refusal(self, max_received_headers: int, client: str) -> Reply | None:
        """Why the complete message cannot be accepted, or None (logs the reason)."""
        qid = self.qid
        if self.too_big:
            log.info("message rejected: too big", event="rejected", qid=qid, size=self.size)
            return R.TOO_BIG
        decoder = self.decoder if self.decoder is not None else self.checker
        if decoder.normalized:
            log.info(
                "{qid}: bare line endings normalised to CRLF",
                event="bare_newlines_normalized",
                qid=qid,
                client=client,
            )
        if decoder.bare_line_endings:
            log.info(
                "message rejected: bare line endings", event="rejected", qid=qid, client=client
            )
            return R.BARE_LINE_ENDINGS
        self.headers.finish()
        if self.headers.received > max_received_headers:
            log.info(
                "message rejected: {hops} Received headers (mail loop?)",
                event="rejected",
                qid=qid,
                hops=self.headers.received,
                client=client,
            )
            return R.TOO_MANY_HOPS
        return None

    def body(self):
        """The sealed `IMessageBody` for end-of-message checks."""
        return self.spoolfile.body()

    def finish(self, verdict, envelope: Envelope, trace: bytes, ctx, session_id: str, started):
        """Apply the end-of-message `verdict` (or a Deferred firing with one), then
        commit: the reply, or a Deferred firing with it."""
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._checked, envelope, trace, ctx, session_id, started)
        return self._checked(verdict, envelope, trace, ctx, session_id, started)

    # -- after the checks --------------------------------------------------------

    def _checked(self, verdict: Verdict, envelope, trace, ctx, session_id, started):
        if self.spoolfile is None:
            return None  # the connection went away while a check was running
        action = verdict.action
        if action is Action.REJECT or action is Action.TEMPFAIL:
            self.abort()
            log.info(
                "{qid}: message refused by policy: {code} {reason}",
                event="rejected",
                qid=self.qid,
                code=verdict.reply.code,
                reason=verdict.reason,
                client=envelope.client_address,
                session=session_id,
            )
            return verdict.reply
        if action is Action.DISCARD:
            self.abort()
            log.info(
                "{qid}: message from <{sender}> discarded by policy: {reason}",
                event="discarded",
                qid=self.qid,
                sender=str(envelope.sender),
                reason=verdict.reason,
                client=envelope.client_address,
                session=session_id,
            )
            return _queued(self.qid)
        if action is Action.QUARANTINE:
            envelope = attrs.evolve(envelope, quarantine=verdict.reason or "quarantined")
            log.info(
                "{qid}: message quarantined by policy: {reason}",
                event="quarantined",
                qid=self.qid,
                reason=envelope.quarantine,
                client=envelope.client_address,
                session=session_id,
            )
        if verdict.headers:
            trace = header_block(verdict.headers) + trace
        if verdict.remove:
            # A check found fields the message must not keep (see mta.headers).
            d = self.spoolfile.remove_headers(verdict.remove)
            d.addCallback(self._removed, envelope, trace, ctx, session_id, started)
            d.addErrback(self._remove_failed)
            return d
        return self._commit(envelope, trace, ctx, session_id, started)

    def _removed(self, count: int, envelope, trace, ctx, session_id, started):
        if self.spoolfile is None:
            return None  # the connection went away meanwhile
        if count:
            log.info(
                "{qid}: removed {count} header field(s) a check distrusts",
                event="headers_removed",
                qid=self.qid,
                count=count,
            )
        self.size = self.spoolfile.size
        return self._commit(envelope, trace, ctx, session_id, started)

    def _remove_failed(self, failure):
        self.abort()
        return write_failed(failure, self.qid)

    def _commit(self, envelope: Envelope, trace: bytes, ctx, session_id: str, started: float):
        spoolfile, self.spoolfile = self.spoolfile, None
        d = spoolfile.commit(envelope, trace)
        d.addCallbacks(
            _committed,
            write_failed,
            callbackArgs=(envelope, self.size, started, ctx, session_id),
            errbackArgs=(self.qid,),
        )
        return d


def header_block(headers) -> bytes:
    """Header fields as one block, each ending in CRLF."""
    return b"".join(h if h.endswith(b"\r\n") else h.rstrip(b"\r\n") + b"\r\n" for h in headers)


def _queued(qid: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {qid}")


def _committed(qid: str, envelope: Envelope, size: int, started: float, ctx, session_id: str):
    log.info(
        "{qid}: accepted from <{sender}> for {nrcpt} recipient(s), {size} bytes",
        event="accepted",
        qid=qid,
        sender=str(envelope.sender),
        recipients=[str(r) for r in envelope.recipients],
        nrcpt=len(envelope.recipients),
        size=size,
        client=envelope.client_address,
        session=session_id,
        helo=envelope.helo,
        listener=envelope.listener,
        tls=envelope.tls,
        user=envelope.authenticated_as,
        duration=round(ctx.clock.seconds() - started, 6),
    )
    reply = _queued(qid)
    queue = ctx.config.queue
    if queue.in_flow_delay and ctx.spool.backlog() > queue.in_flow_limit:
        # Arrivals outrun delivery: slow this client down instead of growing the
        # backlog without bound (Postfix's in_flow_delay).
        return task.deferLater(ctx.clock, queue.in_flow_delay, lambda: reply)
    return reply


def with_earlier(verdict: Verdict, earlier) -> Verdict:
    """The end-of-message `verdict` with the accepting verdicts of earlier phases
    (headers, quarantine reasons) folded in; a refusal stays as it is."""
    if verdict.refuses or verdict.action is Action.DISCARD:
        return verdict
    headers = [h for v in earlier for h in v.headers]
    reasons = [v.reason or "quarantined" for v in earlier if v.action is Action.QUARANTINE]
    if not headers and not reasons:
        return verdict
    if verdict.action is Action.QUARANTINE:
        reasons.append(verdict.reason or "quarantined")
    action = Action.QUARANTINE if reasons else verdict.action
    return Verdict(
        action,
        verdict.reply,
        (*headers, *verdict.headers),
        (),
        "; ".join(reasons),
        verdict.remove,
    )


def write_failed(failure, qid: str) -> Reply:
    """The reply for a spool write or commit that failed (a full disk is a 452)."""
    exc = failure.value
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("{qid}: spool full: {error}", qid=qid, error=str(exc))
        return R.NO_SPACE
    log.failure("{qid}: spool commit failed", failure=failure, qid=qid)
    return R.QUEUE_WRITE_ERROR
