"""The outbound ESMTP client: one connection, any number of transactions.

Our own small protocol rather than `twisted.mail.smtp.ESMTPSender`, which sends one
message per factory, buffers and dot-stuffs the body line by line through Python
callbacks, has no pipelining and no per-step timeouts on an injected clock.

`SMTPClientProtocol` is driven by coroutines (`establish`, `send`, `reset`, `quit`);
each waits for replies under a timeout (`Timeouts`, on the injected clock) that aborts
the connection.  A session-level problem (no greeting, EHLO/HELO refused, TLS
required but not offered, TLS handshake failure, timeout, lost connection) raises
`SessionError`: the relay tries the next mail exchanger.  Everything a server says
about one transaction comes back as a `TransactionOutcome` with a reply per
recipient.

- EHLO, falling back to HELO when EHLO is refused with a 5xx.
- STARTTLS whenever offered (`tls = "opportunistic"`), never with `tls = "none"`;
  `tls = "required"` refuses to go on in clear (450 4.7.10, transient).  A failed
  handshake is NOT retried in plaintext: it loses this connection and the relay
  moves to the next MX (the next attempt starts over).  Plaintext is used only when
  the server did not offer STARTTLS, so an attacker who breaks handshakes cannot
  downgrade a server that offers TLS.  The certificate is not verified (opportunistic
  TLS, like Postfix's `may`): it protects against passive eavesdropping only.
- SIZE: our size is announced; a message over the server's limit fails 552 5.3.4
  without sending it.  `BODY=8BITMIME` when offered and `Message.body` says 8-bit
  (sent as is otherwise, like Postfix with MIME conversion off).  SMTPUTF8:
  requested when offered; a message needing it (a UTF-8 envelope address, or raw
  UTF-8 header fields: `utf8_headers`, which the relay downgrades when it can) fails
  553 5.6.7 when the server lacks it (RFC 6531 3.7.5).
- `SessionError.remote` and `TransactionOutcome.local` tell the server's replies
  from ours (timeout, lost connection, SIZE/SMTPUTF8 refusals) for DSNs.
- DSN (RFC 3461): when the server offers it, the sender's request travels on:
  RET and ENVID on MAIL, NOTIFY and ORCPT on each RCPT (xtext-encoded); the relay
  then leaves success notices to that server.  Without it nothing is added.
- PIPELINING: MAIL, every RCPT and DATA go out in one write; replies are matched in
  order.  If every RCPT failed but DATA got 354, an empty body is ended at once.
- The body is the queue's `IMessageBody` (trace headers, then the message), read in
  large chunks (on a thread pool when one is given) and dot-stuffed per buffer
  with `bytes.replace`, with write flow control; a bare CR or LF goes as CRLF.
"""

from __future__ import annotations

import re
from collections import deque

import attrs
from twisted.internet import defer, interfaces
from twisted.internet.error import ConnectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.envelope import Address, BodyType, Reply
from mta.observe.logging import Logger

log = Logger()

CHUNK = 256 * 1024
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_LINE_END = re.compile(rb"\r\n|\r|\n")


@attrs.frozen
class Timeouts:
    """Seconds to wait for each step (Postfix's smtp_*_timeout defaults, shorter)."""

    greeting: float = 300.0
    command: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0  # no progress while writing the body
    data_done: float = 600.0
    quit: float = 10.0


class SessionError(Exception):
    """The session cannot carry mail (try another MX); `reply` says why: the
    server's own reply when `remote`, else ours (timeout, lost connection, TLS)."""

    def __init__(self, reply: Reply, stage: str, remote: bool = False):
        super().__init__(f"{stage}: {reply}")
        self.reply = reply
        self.stage = stage
        self.remote = remote


@attrs.frozen
class Message:
    """One transaction to send: the envelope part and how to read the content."""

    sender: Address
    recipients: tuple[Address, ...]
    size: int
    body_source: object  # has read() -> Deferred[bytes] (b"" at the end)
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    # The header fields hold raw UTF-8 (RFC 6532): only an SMTPUTF8 server may get it.
    utf8_headers: bool = False
    # DSN request (RFC 3461), sent only to a server offering DSN: RET and ENVID for
    # MAIL; NOTIFY and ORCPT (`type;address`, decoded) parallel to `recipients`,
    # "" where none, or empty tuples.
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    dsn_notify: tuple[str, ...] = ()
    dsn_orcpt: tuple[str, ...] = ()


def xtext_encode(value: str) -> str:
    """RFC 3461 section 4 xtext: `+XX` for "+", "=", controls and space.  A non-ASCII
    character becomes `\\x{HEX}` (RFC 6533 utf-8-addr-xtext; "\\" itself is escaped
    as `+5C` so it cannot be mistaken for one)."""
    out = []
    for ch in value:
        if ch in "+=\\" or ("\x00" <= ch <= " ") or ch == "\x7f":
            out.append(f"+{ord(ch):02X}")
        elif ch.isascii():
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):X}}}")
    return "".join(out)


@attrs.frozen
class TransactionOutcome:
    """Per recipient the reply that decides its fate, and the replies seen.

    `local`: we refused the transaction before sending it (SIZE, SMTPUTF8, binary
    content), so the replies are ours, not the server's."""

    replies: dict[Address, Reply]
    mail: Reply | None = None
    data: Reply | None = None
    sent: bool = False  # the server acknowledged the content
    local: bool = False


class BodyReader:
    """`prefix` (a DKIM signature) then the message of an `IMessageBody`, in chunks
    read on a thread pool when `pool` is given (directly otherwise)."""

    def __init__(self, prefix: bytes, body, reactor=None, pool=None):
        self._prefix = prefix
        self._body = body
        self._reactor = reactor
        self._pool = pool
        self._chunks = None
        self._done = False

    def read(self) -> defer.Deferred:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return defer.succeed(data)
        if self._done:
            return defer.succeed(b"")
        if self._pool is None:
            return defer.maybeDeferred(self._read_chunk)
        return deferToThreadPool(self._reactor, self._pool, self._read_chunk)

    def _read_chunk(self) -> bytes:
        if self._chunks is None:
            self._chunks = self._body.chunks(CHUNK)
        data = next(self._chunks, b"")
        if not data:
            self._done = True
            self._chunks = None
        return data

    def close(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            chunks.close()


class DotStuffer:
    """Dot-stuffing (RFC 5321 4.5.2) over arbitrary buffers, CR LF split or not.

    A bare CR or bare LF becomes CRLF on the way (a queued message has none: the
    session rejects or normalises them), so nothing the receiver might take for a
    line end can put a lone "." on a line (SMTP smuggling, CVE-2023-51764)."""

    def __init__(self) -> None:
        self._held = b""
        self._line_start = True

    def feed(self, data: bytes) -> bytes:
        data = self._held + data
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            data = _LINE_END.sub(b"\r\n", data)
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and out[:1] == b".":
            out = b"." + out
        self._line_start = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """The rest, a line end if needed, and the terminating `.`."""
        tail = self._held
        self._held = b""
        if tail or not self._line_start:
            tail += b"\r\n" if not tail else b"\n"
        return tail + b".\r\n"


def parse_reply(lines: list[bytes]) -> Reply:
    code = int(lines[0][:3])
    texts = [ln[4:].decode("utf-8", "replace") for ln in lines]
    enhanced = ""
    m = _ENHANCED.match(texts[0])
    if m and m.group(1)[0] == str(code)[0]:
        enhanced = m.group(1)
        texts = [t[m.end() :] if _ENHANCED.match(t) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class SMTPClientProtocol(LineReceiver):
    """One outbound connection.  `peer` names it in replies ("mx.example[192.0.2.1]")."""

    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self, clock, timeouts: Timeouts = Timeouts(), peer: str = "peer"):
        self.clock = clock
        self.timeouts = timeouts
        self.peer = peer
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.tls_info = ""
        self.transactions = 0
        self.closed = False
        self.needs_reset = False
        self._partial: list[bytes] = []
        self._replies: deque[Reply] = deque()
        self._waiters: deque[defer.Deferred] = deque()
        self._lost: Failure | None = None
        self._paused: defer.Deferred | None = None
        self._handshake: defer.Deferred | None = None

    # -- twisted ---------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit():
            self._fail_session(Reply(451, "4.5.0", f"{self.peer} sent garbage"))
            return
        self._partial.append(line)
        if line[3:4] == b"-":
            return
        reply = parse_reply(self._partial)
        self._partial = []
        while self._waiters:
            d = self._waiters.popleft()
            if not d.called:
                d.callback(reply)
                return
        self._replies.append(reply)

    def lineLengthExceeded(self, line):
        self._fail_session(Reply(451, "4.5.0", f"{self.peer} sent an overlong line"))

    def connectionLost(self, reason=None) -> None:
        self.closed = True
        self._lost = reason or Failure(ConnectionDone())
        waiters, self._waiters = self._waiters, deque()
        for d in waiters:
            if not d.called:
                d.errback(self._lost)
        for d in (self._paused, self._handshake):
            if d is not None and not d.called:
                d.errback(self._lost)

    def handshakeCompleted(self) -> None:
        get = getattr(self.transport, "getHandle", None)
        try:
            conn = get() if get else None
            if conn is not None:
                self.tls_info = f"{conn.get_protocol_version_name()} {conn.get_cipher_name()}"
        except Exception:
            self.tls_info = "TLS"
        if self._handshake is not None and not self._handshake.called:
            self._handshake.callback(None)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        d, self._paused = self._paused, None
        if d is not None and not d.called:
            d.callback(None)

    def stopProducing(self) -> None:
        self.abort()

    # -- plumbing --------------------------------------------------------------------

    def abort(self) -> None:
        if self.transport is None or self.closed:
            return
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def _fail_session(self, reply: Reply) -> None:
        self._lost = Failure(SessionError(reply, "protocol"))
        self.abort()

    def _send(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    async def _wait(self, d: defer.Deferred, timeout: float, stage: str):
        """Await `d`; after `timeout` seconds abort the connection."""
        timed_out = []

        def expire():
            timed_out.append(True)
            self.abort()
            if not d.called:
                d.errback(
                    SessionError(Reply(451, "4.4.2", f"timeout waiting for {self.peer}"), stage)
                )

        timer = self.clock.callLater(timeout, expire)
        try:
            return await d
        except SessionError:
            raise
        except Exception as e:
            if isinstance(e, defer.CancelledError) or timed_out:
                raise SessionError(
                    Reply(451, "4.4.2", f"timeout waiting for {self.peer}"), stage
                ) from None
            raise SessionError(self._lost_reply(e, stage), stage) from None
        finally:
            if timer.active():
                timer.cancel()

    def _lost_reply(self, exc: BaseException, stage: str) -> Reply:
        if self._lost is not None and self._lost.check(SessionError):
            return self._lost.value.reply
        why = exc.__class__.__name__
        if stage == "tls":
            return Reply(451, "4.7.5", f"TLS handshake with {self.peer} failed: {why}")
        return Reply(451, "4.4.2", f"lost connection with {self.peer} during {stage}")

    async def reply(self, stage: str, timeout: float | None = None) -> Reply:
        """The next reply from the server."""
        if self._replies:
            return self._replies.popleft()
        if self.closed:
            raise SessionError(self._lost_reply(ConnectionDone(), stage), stage)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return await self._wait(d, self.timeouts.command if timeout is None else timeout, stage)

    async def command(self, line: str, stage: str, timeout: float | None = None) -> Reply:
        self._send(line)
        return await self.reply(stage, timeout)

    # -- session ---------------------------------------------------------------------

    async def establish(self, helo: str, tls: str = "opportunistic", tls_context=None) -> None:
        """Greeting, EHLO/HELO and STARTTLS per the `tls` policy; SessionError if unusable."""
        greeting = await self.reply("greeting", self.timeouts.greeting)
        if greeting.code != 220:
            raise SessionError(greeting, "greeting", remote=True)
        await self._hello(helo)
        if tls == "none":
            return
        if "STARTTLS" not in self.extensions or tls_context is None:
            if tls == "required":
                raise SessionError(
                    Reply(450, "4.7.10", f"TLS is required, but was not offered by {self.peer}"),
                    "starttls",
                )
            return
        r = await self.command("STARTTLS", "starttls")
        if r.code != 220:
            if tls == "required":
                raise SessionError(r, "starttls", remote=True)
            return  # refused STARTTLS after offering it: go on in clear, like Postfix
        self._handshake = defer.Deferred()
        self.transport.startTLS(tls_context)
        self.tls = True
        self.extensions = {}
        await self._wait(self._handshake, self.timeouts.command, "tls")
        await self._hello(helo)

    async def _hello(self, helo: str) -> None:
        r = await self.command(f"EHLO {helo}", "ehlo")
        if r.is_success:
            self.esmtp = True
            self.extensions = {}
            for line in r.text.split("\n")[1:]:
                keyword, _, value = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = value.strip()
            return
        if r.code >= 500 and r.code != 554:
            r = await self.command(f"HELO {helo}", "helo")
            if r.is_success:
                self.esmtp = False
                self.extensions = {}
                return
        raise SessionError(r, "ehlo", remote=True)

    async def reset(self) -> None:
        """RSET before reusing the connection; SessionError if it is not usable."""
        r = await self.command("RSET", "rset")
        if not r.is_success:
            raise SessionError(r, "rset", remote=True)
        self.needs_reset = False

    async def quit(self) -> None:
        """QUIT, wait briefly for the reply, close.  Never raises."""
        if self.closed:
            return
        try:
            await self.command("QUIT", "quit", self.timeouts.quit)
        except SessionError:
            pass
        if not self.closed:
            self.transport.loseConnection()

    # -- transaction -----------------------------------------------------------------

    def _refusal(self, message: Message) -> Reply | None:
        limit = self.extensions.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and message.size > int(limit):
            return Reply(
                552,
                "5.3.4",
                f"message size {message.size} exceeds the limit {limit} of {self.peer}",
            )
        needs_utf8 = message.smtputf8 and (
            message.utf8_headers
            or message.sender.is_utf8
            or any(r.is_utf8 for r in message.recipients)
        )
        if needs_utf8 and "SMTPUTF8" not in self.extensions:
            return Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by {self.peer}")
        if message.body is BodyType.BINARY:
            return Reply(554, "5.6.3", "binary content cannot be relayed without CHUNKING")
        return None

    def _mail_command(self, message: Message) -> str:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={message.size}")
        if message.body is BodyType.EIGHT_BIT and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if message.smtputf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        if "DSN" in self.extensions:
            if message.dsn_ret:
                params.append(f"RET={message.dsn_ret}")
            if message.dsn_envid:
                params.append(f"ENVID={xtext_encode(message.dsn_envid)}")
        return " ".join([f"MAIL FROM:{message.sender.path}", *params])

    def _rcpt_commands(self, message: Message) -> list[str]:
        dsn = "DSN" in self.extensions
        lines = []
        for i, rcpt in enumerate(message.recipients):
            params = [f"RCPT TO:{rcpt.path}"]
            if dsn and i < len(message.dsn_notify) and message.dsn_notify[i]:
                params.append(f"NOTIFY={message.dsn_notify[i]}")
            if dsn and i < len(message.dsn_orcpt) and message.dsn_orcpt[i]:
                addr_type, _, address = message.dsn_orcpt[i].partition(";")
                params.append(f"ORCPT={addr_type};{xtext_encode(address)}")
            lines.append(" ".join(params))
        return lines

    async def send(self, message: Message) -> TransactionOutcome:
        """One transaction.  SessionError when the connection fails before the
        server has answered the end of data."""
        refusal = self._refusal(message)
        if refusal is not None:
            return TransactionOutcome({r: refusal for r in message.recipients}, local=True)
        self.transactions += 1
        self.needs_reset = True
        mail_line = self._mail_command(message)
        rcpt_lines = self._rcpt_commands(message)
        if "PIPELINING" in self.extensions:
            self._send(mail_line, *rcpt_lines, "DATA")
            mail = await self.reply("mail")
            rcpts = [await self.reply("rcpt") for _ in rcpt_lines]
            data = await self.reply("data", self.timeouts.data_init)
        else:
            mail = await self.command(mail_line, "mail")
            if not mail.is_success:
                return TransactionOutcome({r: mail for r in message.recipients}, mail)
            rcpts = [await self.command(line, "rcpt") for line in rcpt_lines]
            if not any(r.is_success for r in rcpts):
                return self._outcome(message, mail, rcpts, None)
            data = await self.command("DATA", "data", self.timeouts.data_init)
        if not mail.is_success:
            if data.code == 354:
                await self._end_empty_data()
            return TransactionOutcome({r: mail for r in message.recipients}, mail)
        if data.code != 354:
            return self._outcome(message, mail, rcpts, data)
        if not any(r.is_success for r in rcpts):
            await self._end_empty_data()
            return self._outcome(message, mail, rcpts, None)
        await self._write_body(message.body_source)
        final = await self.reply("end of data", self.timeouts.data_done)
        self.needs_reset = False
        outcome = self._outcome(message, mail, rcpts, final)
        return attrs.evolve(outcome, sent=final.is_success)

    async def _end_empty_data(self) -> None:
        self.transport.write(b".\r\n")
        await self.reply("end of data", self.timeouts.data_done)

    @staticmethod
    def _outcome(message, mail, rcpts, data) -> TransactionOutcome:
        replies = {}
        for rcpt, r in zip(message.recipients, rcpts):
            if not r.is_success or data is None:
                replies[rcpt] = r if not r.is_success else Reply(451, "4.3.0", "no DATA reply")
            else:
                replies[rcpt] = data if data.code != 354 else Reply(451, "4.3.0", "DATA incomplete")
        return TransactionOutcome(replies, mail, data)

    async def _write_body(self, source) -> None:
        stuffer = DotStuffer()
        self.transport.registerProducer(self, True)
        try:
            while True:
                if self.closed:
                    raise SessionError(self._lost_reply(ConnectionDone(), "data"), "data")
                if self._paused is not None:
                    await self._wait(self._paused, self.timeouts.data_block, "data")
                try:
                    chunk = await source.read()
                except OSError as e:
                    self.abort()
                    raise SessionError(
                        Reply(451, "4.3.0", f"cannot read the queued message: {e}"), "data"
                    ) from None
                if not chunk:
                    break
                self.transport.write(stuffer.feed(chunk))
        finally:
            if not self.closed:
                self.transport.unregisterProducer()
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if self.closed:
            raise SessionError(self._lost_reply(ConnectionDone(), "data"), "data")
        self.transport.write(stuffer.finish())
