"""DKIM signing of outbound mail (RFC 6376) with dkimpy, off the reactor thread.

The outbound relay calls `DKIMSigner.sign(sender_domain, message)` just before it
sends a message and prepends the header it gets back (``b""``: send unsigned).
Which domain signs: the From: header's domain when it is listed in ``[dkim]
domains`` (what DMARC aligns on), else the envelope sender's domain when listed,
else nobody.  RSA-SHA256, relaxed/relaxed, the usual header list (From signed
twice so nobody can add a second one).  RSA and dkimpy's header parsing cost
milliseconds, so every signature runs on the thread pool the composition root owns.

Keys are ``<datadir>/dkim/<domain>.<selector>.key`` (PKCS#1 PEM, written by
``mta-admin dkim keygen``), read when first needed and re-read when the file
changes.  Rotation without downtime: the signer re-reads ``[dkim]`` from the config
file when the file changed (checked at most once a second, on the signing thread)
and at once on SIGHUP (`reload`), so switching ``selector`` takes effect in every
worker without a restart.  A listed domain whose key is missing or unreadable is
sent unsigned with one error logged: refusing to send would turn a key mistake
into a mail outage.
"""

from __future__ import annotations

import email.utils
import os
import re
import threading

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool

from mta.config import ConfigError, DKIMConfig, load_config
from mta.observe.logging import Logger

log = Logger()

# RFC 6376 5.4.1's list, trimmed of trace and list headers that change in transit.
SIGN_HEADERS = (
    "from",
    "to",
    "cc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
    "content-id",
    "content-description",
    "resent-date",
    "resent-from",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "sender",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
_HEAD_READ = 64 * 1024  # enough to find From: before reading a whole body
_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def key_path(key_dir: str, domain: str, selector: str) -> str:
    """Where the private key of `domain` under `selector` lives."""
    return os.path.join(key_dir, f"{domain}.{selector}.key")


def header_block(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    return message if end < 0 else message[: end + 2]


def from_domain(message: bytes) -> str | None:
    """The domain of the (first) From: address, lower-cased, or None."""
    headers = header_block(message)
    match = re.search(rb"^from[ \t]*:(.*(?:\r?\n[ \t].*)*)", headers, re.IGNORECASE | re.MULTILINE)
    if not match:
        return None
    value = match.group(1).decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    addresses = email.utils.getaddresses([value])
    for _, addr in addresses:
        if "@" in addr:
            return addr.rpartition("@")[2].strip().rstrip(".").lower() or None
    return None


def headers_to_sign(message: bytes) -> list[bytes]:
    """Those of SIGN_HEADERS present in `message`, plus From once more (over-signing)."""
    present = {
        m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(header_block(message))
    }
    chosen = [h.encode("ascii") for h in SIGN_HEADERS if h in present]
    return chosen + [b"from"]


def sign_message(message: bytes, domain: str, selector: str, private_key: bytes) -> bytes:
    """Blocking: the ``DKIM-Signature: ...\\r\\n`` header for `message` (CRLF lines)."""
    import dkim  # dkimpy; imported here so a server without [dkim] never needs it

    signer = dkim.DKIM(message, linesep=b"\r\n")
    return signer.sign(
        selector.encode("ascii"),
        domain.encode("ascii"),
        private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=headers_to_sign(message),
    )


@attrs.frozen
class _Key:
    mtime_ns: int
    pem: bytes


class DKIMSigner:
    """Signs outbound messages; see the module docstring.

    `config` is the validated `Config` (its ``dkim``, ``datadir`` and ``source``),
    `threadpool` a bounded pool started by the service tree, `reactor` provides
    ``seconds()`` (the config re-check interval) and the thread hop.
    """

    def __init__(self, config, threadpool, reactor, *, check_interval: float = 1.0):
        self.threadpool = threadpool
        self.reactor = reactor
        self.key_dir = config.path("dkim")
        self.check_interval = check_interval
        self._settings: DKIMConfig = config.dkim
        self._source = config.source if os.path.isfile(config.source) else None
        self._datadir = config.datadir
        self._source_mtime: int | None = None
        self._next_check = 0.0
        self._force_check = False
        self._keys: dict[tuple[str, str], _Key] = {}
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    @property
    def settings(self) -> DKIMConfig:
        return self._settings

    def reload(self) -> None:
        """SIGHUP: re-read ``[dkim]`` and the keys before the next signature."""
        with self._lock:
            self._force_check = True
            self._keys.clear()
            self._reported.clear()

    def sign(self, sender_domain: str, message: bytes) -> Deferred:
        """Deferred with the DKIM-Signature header to prepend, or ``b""``."""
        now = self.reactor.seconds()
        check = self._source is not None and now >= self._next_check
        if check:
            self._next_check = now + self.check_interval
        if not self._settings.domains and not check and not self._force_check:
            return succeed(b"")  # signing is off: no thread hop per message
        d = deferToThreadPool(
            self.reactor, self.threadpool, self._sign, (sender_domain or "").lower(), message, check
        )
        return d.addErrback(self._failed)

    def sign_entry(self, entry) -> Deferred:
        """Like `sign`, for a queued `QueueEntry`: the message is its trace headers plus
        the body read from its queue file (on the thread pool, and only in full when
        a listed domain signs it).  The relay prepends the result to what it sends."""
        now = self.reactor.seconds()
        check = self._source is not None and now >= self._next_check
        if check:
            self._next_check = now + self.check_interval
        if not self._settings.domains and not check and not self._force_check:
            return succeed(b"")
        d = deferToThreadPool(
            self.reactor,
            self.threadpool,
            self._sign_file,
            entry.envelope.sender.domain.lower(),
            entry.trace_headers,
            entry.path,
            entry.body_length,
            check,
        )
        return d.addErrback(self._failed)

    def _failed(self, failure) -> bytes:
        log.failure("DKIM signing failed; sending unsigned", failure, event="dkim_failed")
        return b""

    # -- on the thread pool --------------------------------------------------------

    def _sign(self, sender_domain: str, message: bytes, check: bool) -> bytes:
        settings, domain = self._choose(sender_domain, message, check)
        if domain is None:
            return b""
        key = self._key(domain, settings.selector)
        if key is None:
            return b""
        return sign_message(message, domain, settings.selector, key)

    def _sign_file(
        self, sender_domain: str, prefix: bytes, path: str, length: int, check: bool
    ) -> bytes:
        with open(path, "rb") as f:
            head = f.read(min(length, _HEAD_READ))
            settings, domain = self._choose(sender_domain, prefix + head, check)
            if domain is None:
                return b""
            key = self._key(domain, settings.selector)
            if key is None:
                return b""
            rest = f.read(length - len(head)) if length > len(head) else b""
        return sign_message(prefix + head + rest, domain, settings.selector, key)

    def _choose(self, sender_domain: str, message: bytes, check: bool):
        """(settings, signing domain or None) for `message`."""
        if check or self._force_check:
            self._check_config()
        settings = self._settings
        if not settings.domains:
            return settings, None
        domain = from_domain(message)
        if domain not in settings.domains:
            domain = sender_domain if sender_domain in settings.domains else None
        return settings, domain

    def _check_config(self) -> None:
        with self._lock:
            forced, self._force_check = self._force_check, False
        if self._source is None:
            return
        try:
            mtime = os.stat(self._source).st_mtime_ns
        except OSError as e:
            log.warn("cannot stat {path}: {error}", path=self._source, error=str(e))
            return
        if mtime == self._source_mtime and not forced:
            return
        first = self._source_mtime is None
        self._source_mtime = mtime
        try:
            fresh = load_config(self._source, datadir=self._datadir).dkim
        except ConfigError as e:
            log.error(
                "keeping the current [dkim] settings: {error}", error=str(e), event="dkim_reload"
            )
            return
        if fresh != self._settings:
            log.info(
                "DKIM now signs {domains} with selector {selector}",
                domains=list(fresh.domains),
                selector=fresh.selector,
                event="dkim_reload",
            )
            self._settings = fresh
        elif not first:
            log.debug("[dkim] settings unchanged", event="dkim_reload")

    def _key(self, domain: str, selector: str) -> bytes | None:
        path = key_path(self.key_dir, domain, selector)
        try:
            mtime = os.stat(path).st_mtime_ns
            cached = self._keys.get((domain, selector))
            if cached is not None and cached.mtime_ns == mtime:
                return cached.pem
            with open(path, "rb") as f:
                pem = f.read()
        except OSError as e:
            if path not in self._reported:
                self._reported.add(path)
                log.error(
                    "no DKIM key for {domain} selector {selector} ({path}: {error}); "
                    "sending unsigned (mta-admin dkim keygen {domain})",
                    domain=domain,
                    selector=selector,
                    path=path,
                    error=e.strerror or str(e),
                    event="dkim_no_key",
                )
            return None
        with self._lock:
            self._keys[(domain, selector)] = _Key(mtime, pem)
            self._reported.discard(path)
        return pem
