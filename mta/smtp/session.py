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

Policy lives outside: the session makes one `PolicyPipeline.run` call per phase
(connect, HELO/EHLO, MAIL, RCPT, end of message) and never knows which checks ran;
the spool makes messages durable (`mta.smtp.message`); MAIL/RCPT parameters are
parsed by `mta.smtp.params`.  This module never imports the queue or delivery.
"""

from __future__ import annotations

import itertools

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.mail import smtp
from twisted.python.failure import Failure

from mta.config import Config, ListenerConfig
from mta.envelope import BodyType, Envelope, Reply
from mta.observe.logging import Logger
from mta.policy.pipeline import PolicyPipeline
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.smtp import message as M
from mta.smtp import replies as R
from mta.smtp import sasl, wire
from mta.smtp.fixups import missing_headers
from mta.smtp.params import mail_params, parse_recipient, parse_sender, rcpt_params
from mta.smtp.parse import CommandError, split_path_argument
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
    # Every policy decision.  Its RCPT checks resolve recipients: a recipient no check
    # resolves is accepted as given, so the relay check must be among them.
    pipeline: PolicyPipeline
    clock: IReactorTime
    tls: object | None = None  # ServerTLSContext
    authenticator: object | None = None  # mta.smtp.auth.Authenticator, when AUTH is on
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
        self._pipeline = context.pipeline
        self._policy_phases = context.pipeline.phases
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
        self._tls_description: str | None = None
        self.authenticated_as: str | None = None
        # Accepting verdicts with something to carry (headers, quarantine, discard),
        # kept until the end of the message: from CONNECT, from the last HELO/EHLO,
        # and from this transaction's MAIL and RCPT checks.
        self._connect_verdicts: list[Verdict] = []
        self._helo_verdicts: list[Verdict] = []
        self._finishing: M.IncomingMessage | None = None  # committing, or in DATA checks
        self._clear_transaction()

    # -- connection ------------------------------------------------------------

    def connectionMade(self):
        # Replies are small and each one unblocks the client: never let Nagle hold
        # one back waiting for a delayed ACK.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self.setTimeout(self._limits.idle_timeout or None)
        log.debug(
            "connection from {client} on {listener}",
            event="connect",
            session=self.session_id,
            client=self.peer_ip,
            listener=self._ctx.listener.name,
        )
        if Phase.CONNECT not in self._policy_phases:
            wire.send(self.transport, f"220 {self._ctx.hostname} ESMTP mta\r\n".encode())
            return
        context = PolicyContext(self.peer_ip, self._ctx.listener.name, self.session_id)
        verdict = self._pipeline.run(Phase.CONNECT, context)
        if isinstance(verdict, defer.Deferred):
            verdict.addCallback(self._connect_checked)
        else:
            verdict = self._connect_checked(verdict)
        self._settle(verdict)
        self._flush()

    def _connect_checked(self, verdict: Verdict):
        if verdict.refuses:
            log.info(
                "connection from {client} refused by policy: {code} {reason}",
                event="conn_refused",
                client=self.peer_ip,
                code=verdict.reply.code,
                reason=verdict.reason,
                session=self.session_id,
            )
            self._close_with(verdict.reply)
            return None
        _keep(self._connect_verdicts, verdict)
        return Reply(220, "", f"{self._ctx.hostname} ESMTP mta")

    def connectionLost(self, reason=None):
        self.setTimeout(None)
        self._closing = True
        self._abort_message()
        if self._finishing is not None:
            self._finishing.abort()  # no-op once committed
            self._finishing = None
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
        self._tx_verdicts: list[Verdict] = []
        self._message: M.IncomingMessage | None = None
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_error = None
        self._started_at = 0.0

    def _abort_message(self) -> None:
        if self._message is not None:
            self._message.abort()

    def _reset(self) -> None:
        self._abort_message()
        self._clear_transaction()

    def _tls_info(self) -> str | None:
        """The negotiated TLS version and cipher, None in plaintext (cached)."""
        if not self.tls_active:
            return None
        if self._tls_description is None:
            self._tls_description = describe_tls(self.transport)
        return self._tls_description

    # -- commands --------------------------------------------------------------

    def do_EHLO(self, arg: str):
        if not arg:
            return R.EHLO_SYNTAX
        return self._greet(arg, True)

    def do_HELO(self, arg: str):
        if not arg:
            return R.HELO_SYNTAX
        return self._greet(arg, False)

    def _greet(self, name: str, esmtp: bool):
        self._reset()
        if Phase.HELO not in self._policy_phases:
            return self._helo_checked(Verdict.ACCEPT, name, esmtp)
        context = PolicyContext(
            self.peer_ip,
            self._ctx.listener.name,
            self.session_id,
            helo=name,
            esmtp=esmtp,
            tls=self._tls_info(),
            authenticated_as=self.authenticated_as,
        )
        verdict = self._pipeline.run(Phase.HELO, context)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._helo_checked, name, esmtp)
        return self._helo_checked(verdict, name, esmtp)

    def _helo_checked(self, verdict: Verdict, name: str, esmtp: bool) -> Reply:
        self._helo_verdicts = []
        if verdict.refuses:
            self.helo_name = None
            self._esmtp = False
            log.info(
                "HELO {helo} refused by policy: {code} {reason}",
                event="helo_refused",
                helo=name,
                code=verdict.reply.code,
                reason=verdict.reason,
                client=self.peer_ip,
            )
            return verdict.reply
        _keep(self._helo_verdicts, verdict)
        self.helo_name = name
        self._esmtp = esmtp
        if not esmtp:
            return Reply(250, "", self._ctx.hostname)
        lines = [
            f"{self._ctx.hostname} Hello {name}"[:200],
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
        if pa.params and not self._esmtp:
            return R.PARAMS_NEED_EHLO
        params = mail_params(
            pa.params,
            max_size=self._limits.max_message_size,
            auth_enabled=self._ctx.authenticator is not None,
        )
        sender = parse_sender(pa.path, params.smtputf8)
        if Phase.MAIL not in self._policy_phases:
            return self._mail_checked(Verdict.ACCEPT, sender, params)
        context = PolicyContext(
            self.peer_ip,
            listener.name,
            self.session_id,
            self.helo_name,
            self._esmtp,
            self._tls_info(),
            self.authenticated_as,
            sender,
            None,
            (),
            params.body,
            params.smtputf8,
            None,
            params.size,
        )
        verdict = self._pipeline.run(Phase.MAIL, context)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._mail_checked, sender, params)
        return self._mail_checked(verdict, sender, params)

    def _mail_checked(self, verdict: Verdict, sender, params) -> Reply:
        if verdict.refuses:
            return verdict.reply
        self._sender = sender
        self._smtputf8 = params.smtputf8
        self._body_type = params.body
        self._dsn_ret, self._dsn_envid = params.ret, params.envid
        self._started_at = self._ctx.clock.seconds()
        _keep(self._tx_verdicts, verdict)
        return R.SENDER_OK

    def do_RCPT(self, arg: str):
        if self._sender is None:
            return R.NEED_MAIL
        if self._message is not None:
            return R.MIXED_DATA_BDAT
        pa = split_path_argument(arg, "TO", "5.1.3")
        notify = orcpt = ""
        if pa.params:
            if not self._esmtp:
                return R.PARAMS_NEED_EHLO
            notify, orcpt = rcpt_params(pa.params)
        rcpt = parse_recipient(pa.path, self._smtputf8)
        if self._rcpt_count >= self._limits.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if Phase.RCPT not in self._policy_phases:
            return self._rcpt_checked(Verdict.ACCEPT, rcpt, notify, orcpt)
        context = PolicyContext(
            self.peer_ip,
            self._ctx.listener.name,
            self.session_id,
            self.helo_name,
            self._esmtp,
            self._tls_info(),
            self.authenticated_as,
            self._sender,
            rcpt,
            tuple(self._recipients),
            self._body_type,
            self._smtputf8,
        )
        verdict = self._pipeline.run(Phase.RCPT, context)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._rcpt_checked, rcpt, notify, orcpt)
        return self._rcpt_checked(verdict, rcpt, notify, orcpt)

    def _rcpt_checked(self, verdict: Verdict, rcpt, notify: str, orcpt: str) -> Reply:
        if verdict.refuses:
            log.info(
                "recipient rejected: {code} {rcpt} from {client}",
                event="rcpt_rejected",
                code=verdict.reply.code,
                rcpt=str(rcpt),
                client=self.peer_ip,
            )
            return verdict.reply
        self._rcpt_count += 1
        for mailbox in verdict.recipients or (rcpt,):
            if mailbox not in self._recipients:
                self._recipients.append(mailbox)
                self._originals.append(rcpt)
                self._notify.append(notify)
                self._orcpt.append(orcpt)
                if notify or orcpt:
                    self._dsn_used = True
        _keep(self._tx_verdicts, verdict)
        reply = verdict.reply
        return reply if reply is not None and reply.is_success else R.RECIPIENT_OK

    def do_DATA(self, arg: str):
        if arg:
            return R.NO_ARGUMENTS
        if self._sender is None:
            return R.NEED_MAIL
        if self._message is not None:
            return R.MIXED_DATA_BDAT
        if not self._recipients:
            return R.NEED_RCPT
        self._message = M.IncomingMessage(self._ctx.spool, self._limits.max_message_size)
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
        if self._bdat_error is None and self._message is None:
            if self._sender is None:
                self._bdat_error = R.NEED_MAIL
            elif not self._recipients:
                self._bdat_error = R.NEED_RCPT
            else:
                self._message = M.IncomingMessage(
                    self._ctx.spool, self._limits.max_message_size, bdat=True
                )
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
        self._helo_verdicts = []
        self._esmtp = False
        self.tls_active = True
        self._tls_description = None
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

    def _consume_data(self) -> None:
        data = self._inbuf
        self._inbuf = b""
        message = self._message
        body, rest = message.decoder.feed(data)
        if body:
            message.write(body)
        if rest is not None:
            self._inbuf = rest
            self._mode = COMMAND
            self._settle(self._finish_message())

    def _consume_bdat(self) -> None:
        buf = self._inbuf
        n = self._bdat_remaining
        chunk = buf[:n] if len(buf) > n else buf
        self._inbuf = buf[len(chunk) :]
        self._bdat_remaining = n - len(chunk)
        if self._bdat_error is None:
            self._message.checker.feed(chunk)
            self._message.write(chunk)
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
        message = self._message
        if not self._bdat_last:
            if message.too_big:
                return R.TOO_BIG
            return Reply(250, "2.0.0", f"{message.size} octets received")
        message.checker.finish()
        return self._finish_message()

    def _finish_message(self):
        message = self._message
        refusal = message.refusal(self._limits.max_received_headers, self.peer_ip)
        if refusal is not None:
            self._reset()
            return refusal
        qid = message.qid
        ctx = self._ctx
        now = ctx.clock.seconds()
        tls = self._tls_info()
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
            trace += missing_headers(message.headers, queue_id=qid, hostname=ctx.hostname, now=now)
        verdict = self._data_verdict(message, envelope)
        if verdict is None:
            self._reset()
            return M.write_failed(Failure(), qid)
        started = self._started_at
        self._finishing = message
        self._clear_transaction()
        return message.finish(verdict, envelope, trace, ctx, self.session_id, started)

    def _data_verdict(self, message: M.IncomingMessage, envelope: Envelope):
        """The end-of-message verdict (or a Deferred) with what earlier phases said
        folded in; None when the body cannot be read back (a spool write error)."""
        earlier = self._connect_verdicts + self._helo_verdicts + self._tx_verdicts
        for verdict in earlier:
            if verdict.action is Action.DISCARD:
                return verdict  # no point checking a message that will be dropped
        if Phase.DATA in self._policy_phases:
            try:
                body = message.body()
            except OSError:
                return None
            context = PolicyContext(
                self.peer_ip,
                envelope.listener,
                self.session_id,
                self.helo_name,
                self._esmtp,
                envelope.tls,
                self.authenticated_as,
                self._sender,
                None,
                envelope.recipients,
                self._body_type,
                self._smtputf8,
                message.qid,
                message.size,
                body,
            )
            verdict = self._pipeline.run(Phase.DATA, context)
        else:
            verdict = Verdict.ACCEPT
        if not earlier:
            return verdict
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(M.with_earlier, earlier)
        return M.with_earlier(verdict, earlier)


def _keep(kept: list[Verdict], verdict: Verdict) -> None:
    """Remember an accepting verdict that carries something for the message."""
    if verdict is Verdict.ACCEPT or verdict is Verdict.CONTINUE:
        return
    if verdict.headers or verdict.action is Action.QUARANTINE or verdict.action is Action.DISCARD:
        kept.append(verdict)


_COMMANDS = {
    name[3:].encode("ascii"): func
    for name, func in vars(SMTPSession).items()
    if name.startswith("do_") and callable(func)
}
