"""The ESMTP server session: what each command means.

Stock `twisted.mail.smtp.ESMTP` answers the next pipelined line while an asynchronous
check is still pending, keeps processing plaintext that arrived with STARTTLS, parses
and drops SIZE= and BODY=, and pushes DATA line by line through Python.  This session
keeps the class (so it is an `ESMTP` to anything that asks) but reads its input
through `mta.smtp.ordered` (one command at a time, replies in order, DATA and BDAT
framed on whole buffers) and streams each message into one spool file.  STARTTLS
discards every byte that arrived before the handshake and resets the session
(RFC 3207, CVE-2011-0411).

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

from mta.config import Config, ListenerConfig
from mta.envelope import Reply
from mta.observe.logging import Logger
from mta.policy.pipeline import PolicyPipeline
from mta.policy.verdict import Action, Phase, PolicyContext, Verdict
from mta.smtp import message as M
from mta.smtp import replies as R
from mta.smtp import sasl, wire
from mta.smtp.ordered import COMMAND, SASL, OrderedSession, command_table
from mta.smtp.params import NO_MAIL_PARAMS, mail_params, parse_recipient, parse_sender, rcpt_params
from mta.smtp.parse import split_path_argument
from mta.smtp.tls import describe_tls
from mta.smtp.transaction import Transaction

log = Logger()


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


_session_ids = itertools.count(1)


class SMTPSession(OrderedSession):
    """One inbound SMTP connection."""

    def __init__(self, context: SessionContext, peer_ip: str):
        OrderedSession.__init__(self, context.config.limits, context.clock, context.tls)
        self._ctx = context
        self._pipeline = pipeline = context.pipeline
        # Which phases have checks (booleans: hashing an Enum member is slow).
        self._connect_checks = bool(pipeline.checks_for(Phase.CONNECT))
        self._helo_checks = bool(pipeline.checks_for(Phase.HELO))
        self._mail_checks = bool(pipeline.checks_for(Phase.MAIL))
        self._rcpt_checks = bool(pipeline.checks_for(Phase.RCPT))
        self._data_checks = bool(pipeline.checks_for(Phase.DATA))
        self.peer_ip = peer_ip
        self._normalize = context.config.limits.bare_newlines == "normalize"
        # Ties a connection's connect/disconnect events to the messages it sent.
        self.session_id = f"{next(_session_ids):x}"
        self.helo_name: str | None = None
        self._esmtp = False
        self.tls_active = context.listener.tls == "implicit"
        self._tls_description: str | None = None
        self.authenticated_as: str | None = None
        # Accepting verdicts with something to carry (headers, quarantine, discard),
        # kept until the end of the message: from CONNECT, from the last HELO/EHLO,
        # and from this transaction's MAIL and RCPT checks.
        # Accepting verdicts that carry something for the message (headers, a
        # quarantine): tuples, so an idle connection holds none of its own.
        self._connect_verdicts: tuple[Verdict, ...] = ()
        self._helo_verdicts: tuple[Verdict, ...] = ()
        self._finishing: M.IncomingMessage | None = None  # committing, or in DATA checks
        self._tx: Transaction | None = None  # from MAIL FROM to the end of the message
        self._sasl = None
        self._bdat_error: Reply | None = None  # this BDAT transfer is refused

    # -- connection ------------------------------------------------------------

    def connectionMade(self):
        # Replies are small and each one unblocks the client: never let Nagle hold
        # one back waiting for a delayed ACK.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        self._start_timer()
        log.debug(
            "connection from {client} on {listener}",
            event="connect",
            session=self.session_id,
            client=self.peer_ip,
            listener=self._ctx.listener.name,
        )
        if not self._connect_checks:
            wire.send(self.transport, f"220 {self._ctx.hostname} ESMTP mta\r\n".encode())
            return
        context = PolicyContext(self.peer_ip, self._ctx.listener.name, self.session_id)
        self._settle(self._check(Phase.CONNECT, context, self._connect_checked))
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
        self._connect_verdicts = _kept(self._connect_verdicts, verdict)
        return Reply(220, "", f"{self._ctx.hostname} ESMTP mta")

    def connectionLost(self, reason=None):
        self._stop_timer()
        self._closing = True
        self._reset()
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

    # -- state -----------------------------------------------------------------

    def _reset(self) -> None:
        """End the transaction (RSET, HELO, STARTTLS, a refused message)."""
        self._bdat_error = None
        tx, self._tx = self._tx, None
        if tx is not None and tx.message is not None:
            tx.message.abort()

    def _tls_info(self) -> str | None:
        """The negotiated TLS version and cipher, None in plaintext (cached)."""
        if not self.tls_active:
            return None
        if self._tls_description is None:
            self._tls_description = describe_tls(self.transport)
        return self._tls_description

    def _context(self, sender, recipient, recipients, params, queue_id=None, size=0, body=None):
        """The `PolicyContext` of this connection with the transaction fields given."""
        return PolicyContext(
            self.peer_ip,
            self._ctx.listener.name,
            self.session_id,
            self.helo_name,
            self._esmtp,
            self._tls_info(),
            self.authenticated_as,
            sender,
            recipient,
            recipients,
            params.body,
            params.smtputf8,
            queue_id,
            size,
            body,
        )

    def _check(self, phase: Phase, context: PolicyContext, then, *args):
        """Run `phase`'s checks, then `then(verdict, *args)` (now, or when they
        answer)."""
        verdict = self._pipeline.run(phase, context)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(then, *args)
        return then(verdict, *args)

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
        self.helo_name, self._esmtp = name, esmtp
        self._helo_verdicts = ()
        if not self._helo_checks:
            return self._helo_checked(Verdict.ACCEPT, name, esmtp)
        context = self._context(None, None, (), NO_MAIL_PARAMS)
        return self._check(Phase.HELO, context, self._helo_checked, name, esmtp)

    def _helo_checked(self, verdict: Verdict, name: str, esmtp: bool) -> Reply:
        if verdict.refuses:
            self.helo_name, self._esmtp = None, False
            log.info(
                "HELO {helo} refused by policy: {code} {reason}",
                event="helo_refused",
                helo=name,
                code=verdict.reply.code,
                reason=verdict.reason,
                client=self.peer_ip,
            )
            return verdict.reply
        self._helo_verdicts = _kept(self._helo_verdicts, verdict)
        if not esmtp:
            return Reply(250, "", self._ctx.hostname)
        return R.ehlo(
            self._ctx.hostname,
            name,
            self._limits.max_message_size,
            starttls=self._ctx.tls is not None and not self.tls_active,
            auth=sasl.MECHANISMS if self._auth_offered() else (),
        )

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
        if self._tx is not None:
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
        if not self._mail_checks:
            return self._mail_checked(Verdict.ACCEPT, sender, params)
        context = self._context(sender, None, (), params, None, params.size)
        verdict = self._pipeline.run(Phase.MAIL, context)
        if isinstance(verdict, defer.Deferred):
            return verdict.addCallback(self._mail_checked, sender, params)
        return self._mail_checked(verdict, sender, params)

    def _mail_checked(self, verdict: Verdict, sender, params) -> Reply:
        if verdict.refuses:
            return verdict.reply
        self._tx = Transaction(sender, params, self._ctx.clock.seconds())
        _keep(self._tx.verdicts, verdict)
        return R.SENDER_OK

    def do_RCPT(self, arg: str):
        tx = self._tx
        if tx is None:
            return R.NEED_MAIL
        if tx.message is not None:
            return R.MIXED_DATA_BDAT
        pa = split_path_argument(arg, "TO", "5.1.3")
        notify = orcpt = ""
        if pa.params:
            if not self._esmtp:
                return R.PARAMS_NEED_EHLO
            notify, orcpt = rcpt_params(pa.params)
        rcpt = parse_recipient(pa.path, tx.params.smtputf8)
        if tx.rcpt_count >= self._limits.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if not self._rcpt_checks:
            return self._rcpt_checked(Verdict.ACCEPT, rcpt, notify, orcpt)
        params = tx.params
        context = self._context(tx.sender, rcpt, tuple(tx.recipients), params, None, params.size)
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
        tx = self._tx
        tx.add_recipient(rcpt, verdict.recipients or (rcpt,), notify, orcpt)
        _keep(tx.verdicts, verdict)
        reply = verdict.reply
        return reply if reply is not None and reply.is_success else R.RECIPIENT_OK

    def do_DATA(self, arg: str):
        if arg:
            return R.NO_ARGUMENTS
        tx = self._tx
        if tx is None:
            return R.NEED_MAIL
        if tx.message is not None:
            return R.MIXED_DATA_BDAT
        if not tx.recipients:
            return R.NEED_RCPT
        tx.message = M.IncomingMessage(
            self._ctx.spool, self._limits.max_message_size, normalize=self._normalize
        )
        self._begin_data(tx.message)
        return R.START_DATA

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
        if not arg:
            return R.VRFY_SYNTAX  # RFC 5321 4.1.1.6: VRFY takes a string
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
        self._helo_verdicts = ()
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
        if self._tx is not None:
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

    def _bdat_sink(self):
        tx = self._tx
        if self._bdat_error is None and (tx is None or tx.message is None):
            if tx is None:
                self._bdat_error = R.NEED_MAIL
            elif not tx.recipients:
                self._bdat_error = R.NEED_RCPT
            else:
                limit = self._limits.max_message_size
                tx.message = M.IncomingMessage(
                    self._ctx.spool, limit, bdat=True, normalize=self._normalize
                )
        return tx.message if self._bdat_error is None else None

    def _bdat_done(self, last: bool):
        if self._bdat_error is not None:
            reply = self._bdat_error
            if last:
                self._reset()
            return reply
        message = self._tx.message
        if not last:
            if message.too_big:
                return R.TOO_BIG
            return Reply(250, "2.0.0", f"{message.received} octets received")
        message.last_chunk_done()
        return self._finish_message()

    def _finish_message(self):
        tx, self._tx = self._tx, None
        self._finishing = tx.message  # aborted if the connection is lost meanwhile
        ctx = self._ctx
        envelope = tx.envelope(
            self.helo_name or "",
            self.peer_ip,
            self.authenticated_as,
            ctx.listener.name,
            self._tls_info(),
            ctx.clock.seconds(),
        )
        context = None
        if self._data_checks:
            context = self._context(tx.sender, None, envelope.recipients, tx.params)
        earlier = ()
        if self._connect_verdicts or self._helo_verdicts or tx.verdicts:
            earlier = [*self._connect_verdicts, *self._helo_verdicts, *tx.verdicts]
        return M.end_of_message(
            tx, envelope, context, ctx, earlier, self._esmtp, self.tls_active, self.session_id
        )

    _data_done = _finish_message  # the end of DATA (OrderedSession's hook)


def _keeps(verdict: Verdict) -> bool:
    """An accepting verdict that carries something for the message."""
    if verdict is Verdict.ACCEPT or verdict is Verdict.CONTINUE:
        return False
    return bool(
        verdict.headers or verdict.action is Action.QUARANTINE or verdict.action is Action.DISCARD
    )


def _keep(kept: list[Verdict], verdict: Verdict) -> None:
    """Remember `verdict` in `kept` when it carries something for the message."""
    if _keeps(verdict):
        kept.append(verdict)


def _kept(kept: tuple[Verdict, ...], verdict: Verdict) -> tuple[Verdict, ...]:
    """`kept`, plus `verdict` when it carries something for the message."""
    return (*kept, verdict) if _keeps(verdict) else kept


SMTPSession._commands = command_table(SMTPSession)
