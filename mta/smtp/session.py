"""The ESMTP server session: twisted.mail's ESMTP with its input handling replaced.

Stock `twisted.mail.smtp.ESMTP` answers the next pipelined line while an asynchronous
check is still pending, keeps processing plaintext that arrived with STARTTLS, parses
and drops SIZE= and BODY=, and pushes DATA line by line through Python.  This session
keeps the class (so it is an `ESMTP` to anything that asks) but owns `dataReceived`:

* one command at a time: while a reply is a pending Deferred, later input waits in a
  bounded buffer (reading pauses when it grows), so replies always go out in order
  (RFC 2920);
* DATA and BDAT bodies are decoded on whole buffers (`datastream`) and streamed into
  one spool file per transaction;
* STARTTLS discards every byte that arrived before the handshake and resets the
  session (RFC 3207, CVE-2011-0411).

Policy lives outside: recipients are decided by the relay policy, the spool makes
messages durable, and this module never imports the queue runner or delivery.
"""

from __future__ import annotations

import errno
import itertools

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.mail import smtp

from mta.config import Config, ListenerConfig
from mta.envelope import AddressError, BodyType, Envelope, Reply, parse_path
from mta.observe.logging import Logger
from mta.policy.ratelimit import RATE_LIMITED
from mta.policy.relay import ClientInfo, RecipientVerdict, RelayPolicy
from mta.smtp import replies as R
from mta.smtp import sasl, wire
from mta.smtp.datastream import ChunkChecker, DotDecoder
from mta.smtp.fixups import HeaderScanner, missing_headers
from mta.smtp.parse import (
    CommandError,
    notify_param,
    orcpt_param,
    split_path_argument,
    xtext_param,
)
from mta.smtp.received import protocol_name, received_header
from mta.smtp.tls import describe_tls

log = Logger()

COMMAND, DATA, BDAT, SASL = 0, 1, 2, 3
MAX_PENDING_INPUT = 64 * 1024
MAX_ERRORS = 20
_HTTP_VERBS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"))


@attrs.define
class SessionContext:
    """What every session of one listener shares; built once by the composition root."""

    config: Config
    listener: ListenerConfig
    spool: object  # ISpool
    policy: RelayPolicy
    clock: IReactorTime
    tls: object | None = None  # ServerTLSContext
    authenticator: object | None = None  # mta.smtp.auth.Authenticator, when AUTH is on
    sender_policy: object | None = None  # mta.policy.sender.SenderPolicy
    ip_limiter: object | None = None  # mta.policy.ratelimit.RateLimiter per client address
    user_limiter: object | None = None  # the same per authenticated user
    on_close: object | None = None  # callable(session) for connection accounting

    @property
    def hostname(self) -> str:
        return self.config.hostname


_reply_cache: dict[Reply, bytes] = {}
_session_ids = itertools.count(1)


def _encode(reply: Reply) -> bytes:
    data = _reply_cache.get(reply)
    if data is None:
        data = reply.to_bytes()
        if len(_reply_cache) < 256:
            _reply_cache[reply] = data
    return data


class SMTPSession(smtp.ESMTP):
    """One inbound SMTP connection."""

    def __init__(self, context: SessionContext, peer_ip: str):
        smtp.ESMTP.__init__(self, chal={}, contextFactory=context.tls)
        self._ctx = context
        self._limits = context.config.limits
        self.peer_ip = peer_ip
        # Ties a connection's connect/disconnect events to the messages it sent.
        self.session_id = f"{next(_session_ids):x}"
        self.callLater = context.clock.callLater  # TimeoutMixin's clock
        self._inbuf = b""
        # Replies produced while draining input go out together (one write for a
        # pipelined group, RFC 2920 4), see _flush.
        self._out: list[bytes] = []
        self._mode = COMMAND
        self._busy = False
        self._draining = False
        self._paused = False
        self._closing = False
        self._discarding = False
        self._errors = 0
        self.helo_name: str | None = None
        self._esmtp = False
        self.tls_active = context.listener.tls == "implicit"
        self.authenticated_as: str | None = None
        self._clear_transaction()

    # -- connection ------------------------------------------------------------

    def connectionMade(self):
        # Replies are small and each one unblocks the client: never let Nagle hold
        # one back waiting for a delayed ACK.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        wire.send(self.transport, f"220 {self._ctx.hostname} ESMTP mta\r\n".encode())
        self.setTimeout(self._limits.idle_timeout or None)
        log.debug(
            "connection from {client} on {listener}",
            event="connect",
            session=self.session_id,
            client=self.peer_ip,
            listener=self._ctx.listener.name,
        )

    def connectionLost(self, reason=None):
        self.setTimeout(None)
        self._closing = True
        self._abort_message()
        log.debug(
            "connection from {client} on {listener} closed",
            event="disconnect",
            session=self.session_id,
            client=self.peer_ip,
            listener=self._ctx.listener.name,
        )
        if self._ctx.on_close is not None:
            self._ctx.on_close(self)

    def timeoutConnection(self):
        if self._busy:
            self.resetTimeout()
            return
        self._close_with(R.IDLE_TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        self._closing = True
        self._inbuf = b""
        self._out.append(_encode(reply))
        self._flush()
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        self._inbuf = self._inbuf + data if self._inbuf else data
        if self._busy:
            if not self._paused and len(self._inbuf) > MAX_PENDING_INPUT:
                self._paused = True
                self.transport.pauseProducing()
            return
        self._drain()

    def _drain(self) -> None:
        self._draining = True
        try:
            while self._inbuf and not self._busy and not self._closing:
                mode = self._mode
                if mode == COMMAND or mode == SASL:
                    if not self._consume_line():
                        break
                elif mode == DATA:
                    self._consume_data()
                else:
                    self._consume_bdat()
        finally:
            self._draining = False
        self._flush()
        if self._paused and not self._busy and not self._closing:
            self._paused = False
            self.transport.resumeProducing()

    def _consume_line(self) -> bool:
        buf = self._inbuf
        max_line = self._limits.max_line_length
        if self._mode == SASL or buf[:5].upper() == b"AUTH ":
            max_line = sasl.MAX_LINE  # RFC 4954 4
        i = buf.find(b"\n")
        if i < 0:
            if len(buf) > max_line:
                # Drop the over-long line as it streams in; answer once at its end.
                self._discarding = True
                self._inbuf = b""
            return False
        line = buf[:i]
        self._inbuf = buf[i + 1 :]
        if self._discarding or len(line) + 1 > max_line:
            self._discarding = False
            self._respond(R.LINE_TOO_LONG)
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._mode == SASL:
            self._sasl_line(line)
        else:
            self._dispatch(line)
        return True

    def _dispatch(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            if verb in _HTTP_VERBS and self.helo_name is None:
                self._close_with(R.HTTP_PROBE)
                return
            self._respond(R.UNKNOWN_COMMAND)
            return
        try:
            text = arg.decode("utf-8").strip(" ")
        except UnicodeDecodeError:
            self._respond(R.BAD_UTF8)
            return
        if "\x00" in text or "\r" in text:
            self._respond(R.UNKNOWN_COMMAND)
            return
        try:
            result = handler(self, text)
        except CommandError as e:
            result = e.reply
        except Exception:
            log.failure("unexpected error handling {verb}", verb=verb.decode("ascii", "replace"))
            result = R.INTERNAL_ERROR
        self._settle(result)

    def _settle(self, result) -> None:
        if result is None:
            return
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internal_error)
            result.addCallback(self._resume)
            return
        self._respond(result)

    def _internal_error(self, failure) -> Reply:
        log.failure("unexpected error in an asynchronous check", failure=failure)
        return R.INTERNAL_ERROR

    def _resume(self, reply: Reply | None) -> None:
        self._busy = False
        if reply is not None:
            self._respond(reply)
        if not self._draining:
            if self._closing:
                self._flush()
            else:
                self._drain()

    def _respond(self, reply: Reply) -> None:
        if self._closing:
            return
        self._out.append(_encode(reply))
        if reply.code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._close_with(R.TOO_MANY_ERRORS)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            wire.send(self.transport, out[0] if len(out) == 1 else b"".join(out))

    # -- transaction state -----------------------------------------------------

    def _clear_transaction(self) -> None:
        self._sender = None
        self._sasl = None
        self._recipients: list = []
        self._originals: list = []
        self._notify: list[str] = []
        self._orcpt: list[str] = []
        self._dsn_used = False
        self._dsn_ret = self._dsn_envid = None
        self._rcpt_count = 0
        self._body_type = BodyType.SEVEN_BIT
        self._smtputf8 = False
        self._spoolfile = None
        self._qid = None
        self._size = 0
        self._too_big = False
        self._decoder = None
        self._checker = None
        self._headers = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_error = None
        self._started_at = 0.0

    def _abort_message(self) -> None:
        if self._spoolfile is not None:
            try:
                self._spoolfile.abort()
            except Exception:
                log.failure("aborting spool file {qid}", qid=self._qid)
            self._spoolfile = None

    def _reset(self) -> None:
        self._abort_message()
        self._clear_transaction()

    def _client(self) -> ClientInfo:
        return ClientInfo(self.peer_ip, self.authenticated_as)

    # -- commands --------------------------------------------------------------

    def do_EHLO(self, arg: str):
        if not arg:
            return R.EHLO_SYNTAX
        self._reset()
        self.helo_name = arg
        self._esmtp = True
        lines = [
            f"{self._ctx.hostname} Hello {arg}"[:200],
            "PIPELINING",
            f"SIZE {self._limits.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "DSN",
        ]
        if self._ctx.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        return Reply(250, "", "\n".join(lines))

    def _auth_offered(self) -> bool:
        # Never before TLS, on any listener (RFC 4954 4, RFC 8314).
        return (
            self.tls_active
            and self._ctx.authenticator is not None
            and self._ctx.listener.auth != "none"
        )

    def do_HELO(self, arg: str):
        if not arg:
            return R.HELO_SYNTAX
        self._reset()
        self.helo_name = arg
        self._esmtp = False
        return Reply(250, "", self._ctx.hostname)

    def do_MAIL(self, arg: str):
        if self.helo_name is None:
            return R.NEED_HELO
        if self._sender is not None:
            return R.NESTED_MAIL
        listener = self._ctx.listener
        if listener.tls == "required" and not self.tls_active:
            return R.TLS_REQUIRED
        if listener.auth == "required" and not self.authenticated_as:
            return R.AUTH_REQUIRED
        pa = split_path_argument(arg, "FROM", "5.1.7")
        params = pa.params
        if params and not self._esmtp:
            return R.PARAMS_NEED_EHLO
        smtputf8 = False
        body = BodyType.SEVEN_BIT
        ret = envid = None
        for name, value in params.items():
            if name == "SIZE":
                if not value or not value.isdigit() or len(value) > 20:
                    return Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self._limits.max_message_size:
                    return R.TOO_BIG
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(555, "5.5.4", "Unsupported BODY type")
                body = BodyType.EIGHT_BIT if value.upper() == "8BITMIME" else BodyType.SEVEN_BIT
            elif name == "SMTPUTF8":
                if value is not None:
                    return Reply(555, "5.5.4", "SMTPUTF8 takes no value")
                smtputf8 = True
            elif name == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return Reply(501, "5.5.4", "RET must be FULL or HDRS")
                ret = value.upper()
            elif name == "ENVID":
                envid = xtext_param(value, 100)
                if envid is None:
                    return Reply(501, "5.5.4", "Bad ENVID parameter")
            elif name == "AUTH" and self._ctx.authenticator is not None:
                pass  # RFC 4954 5: accepted; we do not relay the submitter identity
            else:
                return Reply(555, "5.5.4", f"Unsupported parameter {name}")
        try:
            sender = parse_path(pa.path, utf8=smtputf8, allow_null=True)
        except AddressError as e:
            if not smtputf8 and not pa.path.isascii():
                return R.NEED_SMTPUTF8
            return Reply(501, "5.1.7", f"Bad sender address syntax: {e}")
        if not sender.is_null and not sender.domain:
            return Reply(501, "5.1.7", "Bad sender address syntax: domain required")
        ctx = self._ctx
        user = self.authenticated_as
        if ctx.ip_limiter is not None and not ctx.ip_limiter.allow(self.peer_ip):
            return RATE_LIMITED
        if user and ctx.user_limiter is not None and not ctx.user_limiter.allow(user):
            return RATE_LIMITED
        if user and ctx.sender_policy is not None:
            d = ctx.sender_policy.check(user, sender)
            return d.addCallback(self._sender_checked, sender, smtputf8, body, ret, envid)
        return self._accept_sender(sender, smtputf8, body, ret, envid)

    def _sender_checked(self, refusal: Reply | None, *args) -> Reply:
        if refusal is not None:
            log.info(
                "sender <{sender}> refused for {user}",
                event="sender_refused",
                sender=str(args[0]),
                user=self.authenticated_as,
                client=self.peer_ip,
            )
            return refusal
        return self._accept_sender(*args)

    def _accept_sender(self, sender, smtputf8: bool, body, ret, envid) -> Reply:
        self._sender = sender
        self._smtputf8 = smtputf8
        self._body_type = body
        self._dsn_ret, self._dsn_envid = ret, envid
        self._started_at = self._ctx.clock.seconds()
        return R.SENDER_OK

    def do_RCPT(self, arg: str):
        if self._sender is None:
            return R.NEED_MAIL
        if self._spoolfile is not None:
            return R.MIXED_DATA_BDAT
        pa = split_path_argument(arg, "TO", "5.1.3")
        notify = orcpt = ""
        if pa.params:
            if not self._esmtp:
                return R.PARAMS_NEED_EHLO
            for name, value in pa.params.items():
                if name == "NOTIFY":
                    notify = notify_param(value)
                    if not notify:
                        return Reply(
                            501,
                            "5.5.4",
                            "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY",
                        )
                elif name == "ORCPT":
                    orcpt = orcpt_param(value)
                    if not orcpt:
                        return Reply(501, "5.5.4", "Bad ORCPT parameter")
                else:
                    return Reply(555, "5.5.4", f"Unsupported parameter {name}")
        try:
            rcpt = parse_path(pa.path, utf8=self._smtputf8)
        except AddressError as e:
            if not self._smtputf8 and not pa.path.isascii():
                return R.NEED_SMTPUTF8
            return Reply(501, "5.1.3", f"Bad recipient address syntax: {e}")
        if self._rcpt_count >= self._limits.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        verdict = self._ctx.policy.check_recipient(self._client(), rcpt)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._apply_verdict, rcpt, notify, orcpt)
        return self._apply_verdict(verdict, rcpt, notify, orcpt)

    def _apply_verdict(
        self, verdict: RecipientVerdict, rcpt, notify: str = "", orcpt: str = ""
    ) -> Reply:
        if verdict.reply.is_success:
            if self._sender is None:  # RSET raced the lookup; cannot happen in order
                return R.NEED_MAIL
            self._rcpt_count += 1
            for mailbox in verdict.recipients:
                if mailbox not in self._recipients:
                    self._recipients.append(mailbox)
                    self._originals.append(rcpt)
                    self._notify.append(notify)
                    self._orcpt.append(orcpt)
                    if notify or orcpt:
                        self._dsn_used = True
        else:
            log.info(
                "recipient rejected: {code} {rcpt} from {client}",
                event="rcpt_rejected",
                code=verdict.reply.code,
                rcpt=str(rcpt),
                client=self.peer_ip,
            )
        return verdict.reply

    def do_DATA(self, arg: str):
        if arg:
            return R.NO_ARGUMENTS
        if self._sender is None:
            return R.NEED_MAIL
        if self._spoolfile is not None:
            return R.MIXED_DATA_BDAT
        if not self._recipients:
            return R.NEED_RCPT
        self._open_message()
        self._decoder = DotDecoder()
        self._mode = DATA
        return R.START_DATA

    def do_BDAT(self, arg: str):
        parts = arg.split()
        if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 18:
            # The chunk length is unknown, so the stream cannot be resynchronised.
            self._close_with(R.BDAT_SYNTAX)
            return None
        if len(parts) == 2 and parts[1].upper() != "LAST":
            self._close_with(R.BDAT_SYNTAX)
            return None
        self._bdat_remaining = int(parts[0])
        self._bdat_last = len(parts) == 2
        if self._bdat_error is None and self._checker is None:
            if self._sender is None:
                self._bdat_error = R.NEED_MAIL
            elif self._decoder is not None or not self._recipients:
                self._bdat_error = R.NEED_RCPT
            else:
                self._open_message()
                self._checker = ChunkChecker()
        self._mode = BDAT
        if self._bdat_remaining == 0:
            return self._bdat_chunk_done()
        return None

    def do_RSET(self, arg: str):
        if arg:
            return R.NO_ARGUMENTS
        self._reset()
        return R.OK

    def do_NOOP(self, arg: str):
        return R.OK

    def do_QUIT(self, arg: str):
        self._close_with(R.BYE)
        return None

    def do_VRFY(self, arg: str):
        return R.VRFY

    def do_EXPN(self, arg: str):
        return R.NOT_IMPLEMENTED

    def do_HELP(self, arg: str):
        return R.HELP

    def do_STARTTLS(self, arg: str):
        if arg:
            return R.NO_ARGUMENTS
        if self.tls_active:
            return R.TLS_ACTIVE
        if self._ctx.tls is None:
            return R.TLS_UNAVAILABLE
        self._respond(R.START_TLS)
        self._flush()  # in plaintext, before the handshake starts
        # CVE-2011-0411: whatever followed STARTTLS in plaintext is an injection.
        self._inbuf = b""
        self._discarding = False
        self._reset()
        self.helo_name = None
        self._esmtp = False
        self.tls_active = True
        self.transport.startTLS(self._ctx.tls)
        return None

    def do_AUTH(self, arg: str):
        if not self.tls_active:
            return R.AUTH_NEEDS_TLS
        if not self._auth_offered():
            return R.AUTH_UNAVAILABLE
        if self.helo_name is None or not self._esmtp:
            return R.NEED_HELO
        if self.authenticated_as:
            return R.ALREADY_AUTHENTICATED
        if self._sender is not None:
            return R.AUTH_IN_TRANSACTION
        try:
            return self._sasl_progress(sasl.start(*sasl.parse_auth_argument(arg)))
        except sasl.SASLError as e:
            return e.reply

    def _sasl_progress(self, step):
        if isinstance(step, sasl.Challenge):
            self._sasl = step
            self._mode = SASL
            return step.reply
        self._sasl = None
        ctx = self._ctx
        d = ctx.authenticator.authenticate(
            step.authcid, step.password, self.peer_ip, ctx.listener.name, mechanism=step.mechanism
        )
        return d.addCallback(self._authenticated)

    def _authenticated(self, result) -> Reply:
        if result.ok:
            self.authenticated_as = result.username
        return result.reply

    def _sasl_line(self, line: bytes) -> None:
        self._mode = COMMAND
        step, self._sasl = self._sasl, None
        try:
            result = self._sasl_progress(step.step(line))
        except sasl.SASLError as e:
            result = e.reply
        except Exception:
            log.failure("unexpected error in SASL exchange")
            result = R.INTERNAL_ERROR
        self._settle(result)

    # -- message body ----------------------------------------------------------

    def _open_message(self) -> None:
        spool = self._ctx.spool
        self._qid = spool.new_queue_id()
        self._spoolfile = spool.open(self._qid)
        self._size = 0
        self._headers = HeaderScanner()

    def _write_body(self, data: bytes) -> None:
        if not self._headers.done:
            self._headers.feed(data)
        self._size += len(data)
        if self._too_big:
            return
        if self._size > self._limits.max_message_size:
            self._too_big = True
            self._abort_message()
            return
        self._spoolfile.write(data)

    def _consume_data(self) -> None:
        data = self._inbuf
        self._inbuf = b""
        body, rest = self._decoder.feed(data)
        if body:
            self._write_body(body)
        if rest is not None:
            self._inbuf = rest
            self._mode = COMMAND
            self._settle(self._finish_message(self._decoder.bare_line_endings))

    def _consume_bdat(self) -> None:
        buf = self._inbuf
        n = self._bdat_remaining
        chunk = buf[:n] if len(buf) > n else buf
        self._inbuf = buf[len(chunk) :]
        self._bdat_remaining = n - len(chunk)
        if self._bdat_error is None:
            self._checker.feed(chunk)
            self._write_body(chunk)
        if self._bdat_remaining == 0:
            self._mode = COMMAND
            self._settle(self._bdat_chunk_done())

    def _bdat_chunk_done(self):
        self._mode = COMMAND
        if self._bdat_error is not None:
            reply = self._bdat_error
            if self._bdat_last:
                self._reset()
            return reply
        if not self._bdat_last:
            if self._too_big:
                return R.TOO_BIG
            return Reply(250, "2.0.0", f"{self._size} octets received")
        self._checker.finish()
        return self._finish_message(self._checker.bare_line_endings)

    def _finish_message(self, bare_line_endings: bool):
        qid = self._qid
        if self._too_big:
            log.info("message rejected: too big", event="rejected", qid=qid, size=self._size)
            self._reset()
            return R.TOO_BIG
        if bare_line_endings:
            log.info(
                "message rejected: bare line endings",
                event="rejected",
                qid=qid,
                client=self.peer_ip,
            )
            self._reset()
            return R.BARE_LINE_ENDINGS
        self._headers.finish()
        if self._headers.received > self._limits.max_received_headers:
            log.info(
                "message rejected: {hops} Received headers (mail loop?)",
                event="rejected",
                qid=qid,
                hops=self._headers.received,
                client=self.peer_ip,
            )
            self._reset()
            return R.TOO_MANY_HOPS
        ctx = self._ctx
        now = ctx.clock.seconds()
        tls = describe_tls(self.transport) if self.tls_active else None
        envelope = Envelope(
            sender=self._sender,
            recipients=tuple(self._recipients),
            original_recipients=tuple(self._originals),
            helo=self.helo_name or "",
            client_address=self.peer_ip,
            authenticated_as=self.authenticated_as,
            listener=ctx.listener.name,
            tls=tls,
            body=self._body_type,
            smtputf8=self._smtputf8,
            received_at=now,
            dsn_ret=self._dsn_ret,
            dsn_envid=self._dsn_envid,
            dsn_notify=tuple(self._notify) if self._dsn_used else (),
            dsn_orcpt=tuple(self._orcpt) if self._dsn_used else (),
        )
        trace = received_header(
            helo=self.helo_name or "",
            client_ip=self.peer_ip,
            hostname=ctx.hostname,
            protocol=protocol_name(
                esmtp=self._esmtp,
                tls=self.tls_active,
                auth=bool(self.authenticated_as),
                utf8=self._smtputf8,
            ),
            queue_id=qid,
            recipient=str(self._originals[0]) if len(self._originals) == 1 else None,
            tls=tls,
            now=now,
        )
        if self.authenticated_as:
            # RFC 6409 8: a submission server completes what the client left out.
            trace += missing_headers(self._headers, queue_id=qid, hostname=ctx.hostname, now=now)
        spoolfile, size, started = self._spoolfile, self._size, self._started_at
        self._spoolfile = None
        self._clear_transaction()
        d = spoolfile.commit(envelope, trace)
        d.addCallbacks(
            self._committed,
            self._commit_failed,
            callbackArgs=(envelope, size, started),
            errbackArgs=(qid,),
        )
        return d

    def _committed(self, qid: str, envelope: Envelope, size: int, started: float):
        ctx = self._ctx
        log.info(
            "{qid}: accepted from <{sender}> for {nrcpt} recipient(s), {size} bytes",
            event="accepted",
            qid=qid,
            sender=str(envelope.sender),
            recipients=[str(r) for r in envelope.recipients],
            nrcpt=len(envelope.recipients),
            size=size,
            client=self.peer_ip,
            session=self.session_id,
            helo=envelope.helo,
            listener=envelope.listener,
            tls=envelope.tls,
            user=envelope.authenticated_as,
            duration=round(ctx.clock.seconds() - started, 6),
        )
        reply = Reply(250, "2.0.0", f"Ok: queued as {qid}")
        queue = ctx.config.queue
        if queue.in_flow_delay and ctx.spool.backlog() > queue.in_flow_limit:
            # Arrivals outrun delivery: slow this client down instead of growing the
            # backlog without bound (Postfix's in_flow_delay).
            return task.deferLater(ctx.clock, queue.in_flow_delay, lambda: reply)
        return reply

    def _commit_failed(self, failure, qid: str) -> Reply:
        exc = failure.value
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("{qid}: spool full: {error}", qid=qid, error=str(exc))
            return R.NO_SPACE
        log.failure("{qid}: spool commit failed", failure=failure, qid=qid)
        return R.QUEUE_WRITE_ERROR


_COMMANDS = {
    name[3:].encode("ascii"): func
    for name, func in vars(SMTPSession).items()
    if name.startswith("do_") and callable(func)
}
