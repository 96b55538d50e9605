"""SpamAssassin as an end-of-message check: our own SPAMC/1.5 client and `SpamCheck`.

`SpamdClient.symbols(message)` sends `SYMBOLS SPAMC/1.5` with the message and reads
spamd's answer (spamd says `SPAMD/1.1` whatever we speak): a `Spam: True ; S / T`
header with the score and spamd's own required score, and a body listing the names
of the rules that hit.  One connection per message, as spamd wants.  `tell` (and
`tell_blocking`, for mta-admin, which runs no reactor) teaches spamd's Bayes database
with `TELL` (`Message-class: spam|ham`, `Set: local`; spamd needs --allow-tell).

`SpamCheck` (the `spamd` check, `Phase.DATA`) reads the message on a thread (it is at
most `spam_max_size` bytes: bigger ones are not sent, only tagged as not scanned),
asks spamd, and tags the message with `X-Spam-Status`, `X-Spam-Score` and, for spam,
`X-Spam-Flag: YES`; `spam_action` then says what spam means: `tag` (deliver with the
tags), `quarantine` or `reject` (550 5.7.1).  Authenticated submissions are not
spam-checked (they are still virus-scanned).  A spamd that is down, slow or talks
nonsense makes the check fail; the pipeline turns that into 451 or skips it
(`[checks] fail`).
"""

from __future__ import annotations

import socket

import attrs
from twisted.internet import defer, threads
from zope.interface import implementer

from mta.envelope import Reply
from mta.interfaces import IPolicyCheck
from mta.observe.logging import Logger
from mta.policy.daemons import DaemonError, ReplyCollector, connect, parse_address
from mta.policy.verdict import Phase, PolicyContext, Verdict

log = Logger()

DEFAULT_MAX_SIZE = 512 * 1024
SPAM_REJECTED = Reply(550, "5.7.1", "Message rejected as spam")
ACTIONS = ("tag", "quarantine", "reject")


@attrs.frozen
class SpamResult:
    """What spamd said about one message."""

    is_spam: bool  # spamd's own judgement (its required score)
    score: float
    required: float
    tests: tuple[str, ...] = ()


def parse_reply(data: bytes) -> SpamResult:
    """A `SpamResult` from spamd's whole answer to SYMBOLS or CHECK; raises
    DaemonError for an error answer or one we cannot read."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data, b""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/"):
        raise DaemonError(f"not a spamd answer: {lines[0][:80]!r}")
    if status[1] != "0":
        raise DaemonError(f"spamd error: {' '.join(status[1:])[:200]}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() != "spam":
            continue
        # "True ; 1000.0 / 5.0"
        verdict, _, scores = value.partition(";")
        score, _, required = scores.partition("/")
        try:
            score_f, required_f = float(score), float(required)
        except ValueError:
            raise DaemonError(f"unreadable Spam header: {line[:120]!r}") from None
        flag = verdict.strip().lower()
        tests = tuple(t for t in body.decode("latin-1").strip().split(",") if t)
        return SpamResult(flag in ("true", "yes"), score_f, required_f, tests)
    raise DaemonError("spamd answer without a Spam header")


def spamc_request(command: bytes, message: bytes, user: str, extra: bytes = b"") -> bytes:
    """One SPAMC/1.5 request: `command`, its headers (`extra` ends in CRLF), the message."""
    return (
        command
        + b" SPAMC/1.5\r\nContent-length: %d\r\nUser: " % len(message)
        + user.encode("ascii", "replace")
        + b"\r\n"
        + extra
        + b"\r\n"
        + message
    )


@attrs.frozen
class TellResult:
    """spamd's answer to TELL: `learned` is False when its Bayes database already
    held the message in that class (nothing changed)."""

    status: str
    learned: bool


def tell_request(message: bytes, spam: bool, user: str = "mta") -> bytes:
    """TELL with `Message-class: spam|ham` and `Set: local` (spamd's own Bayes
    database, not a remote reporting service)."""
    extra = b"Message-class: " + (b"spam" if spam else b"ham") + b"\r\nSet: local\r\n"
    return spamc_request(b"TELL", message, user, extra)


def parse_tell_reply(data: bytes) -> TellResult:
    """A `TellResult` from spamd's whole answer to TELL; DaemonError for a refusal
    (spamd without --allow-tell answers `69 Service Unavailable`) or junk."""
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1")
    lines = head.split("\r\n")
    status = lines[0]
    parts = status.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("SPAMD/"):
        raise DaemonError(f"not a spamd answer: {status[:80]!r}")
    if parts[1] != "0":
        raise DaemonError(f"spamd refused TELL: {' '.join(parts[1:])[:200]}")
    did_set = set()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "didset":
            did_set.update(v.strip().lower() for v in value.split(","))
    return TellResult(status, "local" in did_set)


class SpamdClient:
    """Talks SPAMC/1.5 to one spamd through a client `endpoint`."""

    def __init__(self, endpoint, user: str = "mta"):
        self._endpoint = endpoint
        self._user = user

    def symbols(self, message: bytes) -> defer.Deferred:
        """Deferred `SpamResult` for `message` (cancellable: closes the connection)."""
        return defer.Deferred.fromCoroutine(self._ask(b"SYMBOLS", message))

    def tell(self, message: bytes, spam: bool) -> defer.Deferred:
        """Teach spamd's Bayes database that `message` is spam (or ham); Deferred
        `TellResult`.  spamd must run with --allow-tell."""
        return defer.Deferred.fromCoroutine(self._tell(message, spam))

    def _request(self, command: bytes, message: bytes, extra: bytes = b"") -> bytes:
        return spamc_request(command, message, self._user, extra)

    async def _exchange(self, request: bytes) -> bytes:
        protocol = ReplyCollector()
        await connect(self._endpoint, protocol)
        protocol.transport.write(request)
        # spamd reads up to Content-length; half-closing is not needed.
        return await protocol.reply

    async def _ask(self, command: bytes, message: bytes) -> SpamResult:
        return parse_reply(await self._exchange(self._request(command, message)))

    async def _tell(self, message: bytes, spam: bool) -> TellResult:
        return parse_tell_reply(await self._exchange(tell_request(message, spam, self._user)))


@implementer(IPolicyCheck)
@attrs.define
class SpamCheck:
    """The `spamd` check (see the module docstring)."""

    client: SpamdClient
    reactor: object
    threshold: float | None = None
    action: str = "tag"
    max_size: int = DEFAULT_MAX_SIZE
    name: str = "spamd"
    phases: tuple = (Phase.DATA,)
    pool: object = None  # where the message is read (the reactor's own pool when None)

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"spam action must be one of {', '.join(ACTIONS)}")

    def check(self, phase: Phase, context: PolicyContext):
        if context.body is None:
            return Verdict.CONTINUE
        if context.authenticated_as is not None:
            log.debug(
                "{qid}: spamd: not asked for an authenticated submission",
                event="check",
                check=self.name,
                result="skipped",
                qid=context.queue_id,
            )
            return Verdict.CONTINUE
        size = context.size or context.body.size
        if size > self.max_size:
            log.info(
                "{qid}: spamd: not scanned, {size} bytes > spam_max_size {max_size}",
                event="check",
                check=self.name,
                result="skipped",
                qid=context.queue_id,
                size=size,
                max_size=self.max_size,
            )
            header = b"X-Spam-Status: Unknown, not scanned (size=%d > %d)\r\n" % (
                size,
                self.max_size,
            )
            return Verdict.continue_(headers=(header,))
        return defer.Deferred.fromCoroutine(self._scan(context))

    async def _scan(self, context: PolicyContext) -> Verdict:
        started = self.reactor.seconds()
        pool = self.pool if self.pool is not None else self.reactor.getThreadPool()
        message = await threads.deferToThreadPool(
            self.reactor, pool, _read_all, context.body, self.max_size
        )
        result = await self.client.symbols(message)
        return self.verdict(result, context.queue_id, self.reactor.seconds() - started)

    def verdict(
        self, result: SpamResult, qid: str | None = None, duration: float | None = None
    ) -> Verdict:
        """The verdict and tags for spamd's `result` (logged with the queue id and how
        long the scan took)."""
        required = result.required if self.threshold is None else self.threshold
        spam = result.is_spam if self.threshold is None else result.score >= required
        headers = spam_headers(result.score, required, result.tests, spam)
        outcome = "spam" if spam else "ham"
        log.info(
            "{qid}: spamd: {result}, score {score} required {required} ({action})",
            event="check",
            check=self.name,
            result=outcome,
            qid=qid,
            duration=duration,
            score=result.score,
            required=required,
            tests=",".join(result.tests),
            action=self.action if spam else "accept",
        )
        if not spam or self.action == "tag":
            return Verdict.continue_(headers=headers)
        reason = f"spam (score {result.score:g}, required {required:g})"
        if self.action == "quarantine":
            return Verdict.quarantine(reason, headers=headers)
        return Verdict.reject(SPAM_REJECTED, reason)


def spam_headers(score: float, required: float, tests, spam: bool) -> tuple[bytes, ...]:
    """X-Spam-Status (folded at commas), X-Spam-Score and, for spam, X-Spam-Flag."""
    line = f"X-Spam-Status: {'Yes' if spam else 'No'}, score={score:.1f} required={required:.1f}"
    names = list(tests) or ["none"]
    tokens = ["tests=" + names[0]] + names[1:]
    lines = []
    for i, token in enumerate(tokens):
        sep = " " if i == 0 else ","
        if len(line) + len(sep) + len(token) > 76:
            lines.append(line + ("" if i == 0 else ","))
            line = "\t" + token
        else:
            line += sep + token
    lines.append(line)
    out = ["\r\n".join(lines) + "\r\n", f"X-Spam-Score: {score:.1f}\r\n"]
    if spam:
        out.append("X-Spam-Flag: YES\r\n")
    return tuple(h.encode("ascii", "replace") for h in out)


def _read_all(body, limit: int) -> bytes:
    """The whole message (blocking; at most `limit` bytes are kept)."""
    parts, size = [], 0
    chunks = body.chunks(65536)
    try:
        for chunk in chunks:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                break
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return b"".join(parts)[:limit]


# -- blocking helpers for mta-admin ------------------------------------------------

_OUR_HEADERS = (b"x-spam-status:", b"x-spam-score:", b"x-spam-flag:")


def strip_spam_headers(message: bytes) -> bytes:
    """`message` without the X-Spam-Status/-Score/-Flag headers our check added (with
    their folded lines): Bayes should learn the message, not our earlier verdict.
    CRLF or LF lines (an mbox gives LF); a message without a header end is kept."""
    kept, dropping, pos = [], False, 0
    while True:
        newline = message.find(b"\n", pos)
        if newline < 0:
            return message
        line, pos = message[pos : newline + 1], newline + 1
        if line in (b"\r\n", b"\n"):
            return b"".join(kept) + line + message[pos:]
        if line[:1] not in (b" ", b"\t"):
            dropping = line.lower().startswith(_OUR_HEADERS)
        if not dropping:
            kept.append(line)


def tell_blocking(
    address: str, message: bytes, spam: bool, *, user: str = "mta", timeout: float = 60.0
) -> TellResult:
    """TELL spamd at `address` (host:port or a unix socket path) over a plain blocking
    socket, for mta-admin, which runs no reactor.  DaemonError says what went wrong."""
    parsed = parse_address(address)
    try:
        if isinstance(parsed, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(parsed)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(parsed, timeout=timeout)
        with sock:
            sock.sendall(tell_request(message, spam, user))
            data = b""
            while len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        raise DaemonError(f"spamd at {address} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise DaemonError(f"cannot reach spamd at {address}: {e.strerror or e}") from None
    return parse_tell_reply(data)
