"""`OrderedSession`: the input side of the SMTP session, answering strictly in order.

twisted.mail's `ESMTP` answers the next pipelined line while an asynchronous check is
still pending.  This base class owns `dataReceived` instead:

* one command at a time: a handler returns a `Reply`, None (it answered itself), or
  a Deferred firing with either; while one is pending the session is busy and later
  input waits in a bounded buffer (reading pauses when it grows), so replies always
  go out in order (RFC 2920);
* replies produced while draining one read go out in one write (RFC 2920 4);
* over-long lines are answered once, at their end; too many errors close the
  connection; an HTTP request before HELO is dropped;
* slow clients meet one deadline (see "the deadline" below): a command line has
  idle_timeout from its first byte, DATA and BDAT must keep up min_data_rate;
* DATA and BDAT are framed here, on whole buffers: DATA bytes go to a sink's
  `feed_data` (which finds the end, see `mta.smtp.datastream`) and BDAT chunks of
  the announced length to its `feed_chunk`; no body ever goes through the line
  reader.

The subclass supplies the command handlers (`do_<VERB>`, collected by
`command_table`) and the hooks: `_data_done()` at the end of DATA, `_bdat_sink()`
when a BDAT chunk starts (the sink, or None to consume it unseen), `_bdat_done(last)`
after each chunk, and `_sasl_line(line)` in an AUTH exchange.  Each returns what a
command handler returns.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.mail import smtp

from mta.envelope import Reply
from mta.observe.logging import Logger
from mta.smtp import replies as R
from mta.smtp import sasl, wire
from mta.smtp.parse import CommandError

log = Logger()

COMMAND, DATA, BDAT, SASL = 0, 1, 2, 3
MAX_PENDING_INPUT = 64 * 1024
MAX_ERRORS = 20
_HTTP_VERBS = frozenset((b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"))

_reply_cache: dict[Reply, bytes] = {}


def encode(reply: Reply) -> bytes:
    """The wire form of `reply`, cached for the fixed replies."""
    data = _reply_cache.get(reply)
    if data is None:
        data = reply.to_bytes()
        if len(_reply_cache) < 256:
            _reply_cache[reply] = data
    return data


def command_table(cls) -> dict:
    """{b"VERB": handler} for every `do_VERB` method of `cls` and its bases."""
    table = {}
    for klass in reversed(cls.__mro__):
        for name, func in vars(klass).items():
            if name.startswith("do_") and callable(func):
                table[name[3:].encode("ascii")] = func
    return table


class OrderedSession(smtp.ESMTP):
    """Line input, ordered replies, pausing and error counting for one connection."""

    _commands: dict = {}  # set by the subclass: command_table(Subclass)
    helo_name: str | None = None

    def __init__(self, limits, clock, tls_context=None):
        smtp.ESMTP.__init__(self, chal={}, contextFactory=tls_context)
        self._limits = limits
        self._clock = clock
        self.callLater = clock.callLater
        self._timer = None  # the DelayedCall that enforces `_deadline`
        self._deadline = 0.0
        self._inbuf = b""
        self._out: list[bytes] = []
        self._mode = COMMAND
        self._busy = False
        self._draining = False
        self._paused = False
        self._closing = False
        self._discarding = False
        self._errors = 0
        self._sink = None  # where DATA / BDAT bytes go
        self._bdat_remaining = 0
        self._bdat_last = False

    # -- the deadline ------------------------------------------------------------
    #
    # One lazy timer per connection: moving the deadline is an assignment, and the
    # DelayedCall is only re-armed when it fires early (the deadline never moves
    # backwards, so the timer never fires late).  The deadline is idle_timeout after
    # the first byte of the command line in progress (or after the last complete
    # one); while a reply is pending it waits; a DATA or BDAT transfer starts with
    # idle_timeout to live and every N bytes received add N / min_data_rate seconds,
    # never more than idle_timeout ahead (Postfix's smtpd_min_data_rate).  Past it:
    # 421 4.4.2 and the connection is closed.

    def _start_timer(self) -> None:
        idle = self._limits.idle_timeout
        if idle:
            self._deadline = self._clock.seconds() + idle
            self._timer = self.callLater(idle, self._timer_fired)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _touch(self) -> None:
        """A new idle period starts now."""
        if self._timer is not None:
            self._deadline = self._clock.seconds() + self._limits.idle_timeout

    def _transfer_progress(self, received: int) -> None:
        if self._timer is None:
            return
        now = self._clock.seconds()
        rate = self._limits.min_data_rate
        idle = self._limits.idle_timeout
        if rate:
            self._deadline = min(self._deadline + received / rate, now + idle)
        else:
            self._deadline = now + idle

    def _timer_fired(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._clock.seconds()
        if self._busy:
            self._deadline = max(self._deadline, now + self._limits.idle_timeout)
        if now < self._deadline:
            self._timer = self.callLater(self._deadline - now, self._timer_fired)
            return
        self._close_with(R.IDLE_TIMEOUT)

    def _close_with(self, reply: Reply) -> None:
        self._closing = True
        self._inbuf = b""
        self._out.append(encode(reply))
        self._flush()
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        mode = self._mode
        if mode == DATA or mode == BDAT:
            self._transfer_progress(len(data))
        elif not self._inbuf and not self._discarding:
            # The first byte of a command line starts its clock: the line must be
            # complete within idle_timeout of it, trickling bytes buys no time.
            self._touch()
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
        handler = self._commands.get(verb)
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

    # -- output ----------------------------------------------------------------

    def _settle(self, result) -> None:
        """Answer `result` (a Reply, None, or a Deferred firing with either)."""
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
        self._out.append(encode(reply))
        if reply.code >= 500:
            self._errors += 1
            if self._errors >= MAX_ERRORS:
                self._close_with(R.TOO_MANY_ERRORS)

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            wire.send(self.transport, out[0] if len(out) == 1 else b"".join(out))

    # -- DATA and BDAT ---------------------------------------------------------

    def _begin_data(self, sink) -> None:
        """Read DATA into `sink` (after the 354) until `sink.feed_data` finds its end."""
        self._sink = sink
        self._mode = DATA
        self._touch()

    def _consume_data(self) -> None:
        data = self._inbuf
        self._inbuf = b""
        rest = self._sink.feed_data(data)
        if rest is not None:
            self._inbuf = rest
            self._mode = COMMAND
            self._sink = None
            self._touch()
            self._settle(self._data_done())

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
        self._sink = self._bdat_sink()
        if self._bdat_remaining == 0:
            return self._chunk_done()
        self._mode = BDAT
        self._touch()
        return None

    def _consume_bdat(self) -> None:
        buf = self._inbuf
        n = self._bdat_remaining
        chunk = buf[:n] if len(buf) > n else buf
        self._inbuf = buf[len(chunk) :]
        self._bdat_remaining = n - len(chunk)
        if self._sink is not None:
            self._sink.feed_chunk(chunk)
        if self._bdat_remaining == 0:
            self._settle(self._chunk_done())

    def _chunk_done(self):
        if self._mode == BDAT:
            self._touch()
        self._mode = COMMAND
        self._sink = None
        return self._bdat_done(self._bdat_last)

    # -- supplied by the subclass ------------------------------------------------

    def _data_done(self):
        raise NotImplementedError

    def _bdat_sink(self):
        raise NotImplementedError

    def _bdat_done(self, last: bool):
        raise NotImplementedError

    def _sasl_line(self, line: bytes) -> None:
        raise NotImplementedError
