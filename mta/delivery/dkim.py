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
changes.  Rotation without downtime: the composition root watches the config file
(`mta.app.ConfigWatcher`) and pushes a changed ``[dkim]`` table with `update`, and
SIGHUP (`reload`) drops the cached keys, so switching ``selector`` takes effect in
every worker without a restart.  The signer itself never reads the config.  A listed domain whose key is missing or unreadable is
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

from mta.config import DKIMConfig
from mta.headers import field_present, results_by
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
_READ_CHUNK = 256 * 1024
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


def arc_seal(message: bytes, domain: str, selector: str, private_key: bytes, srv_id: str) -> bytes:
    """The next ARC set (RFC 8617) for `message`, sealed by `domain`: it vouches for
    our Authentication-Results (authserv-id `srv_id`), including its `arc=` (the
    chain as it arrived), so the next hop can trust what we saw.  b"" when dkimpy
    finds no results of ours to seal or a chain it must not extend."""
    import dkim

    fields = dkim.arc_sign(
        message, selector.encode("ascii"), domain.encode("ascii"), private_key, srv_id.encode()
    )
    return b"".join(f if f.endswith(b"\r\n") else f.rstrip(b"\r\n") + b"\r\n" for f in fields)


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

    `settings` is the validated ``[dkim]`` table, `key_dir` where the keys are,
    `threadpool` a bounded pool started by the service tree, `reactor` the thread hop.
    `seal_as` (our host name with ``[checks] arc_seal``, else ""): also ARC-seal
    (RFC 8617) what we relay that came in from outside, i.e. carries our
    Authentication-Results, with the ``[dkim]`` key of that host's domain.
    """

    def __init__(
        self,
        settings: DKIMConfig,
        key_dir: str,
        threadpool,
        reactor,
        *,
        seal_as: str = "",
    ):
        self.threadpool = threadpool
        # `[checks] arc_seal`: ARC-seal what carries our (authserv-id `seal_as`)
        # Authentication-Results; "" for off
        self._ours = (results_by(seal_as),) if seal_as else ()
        self.authserv_id = seal_as
        self.reactor = reactor
        self.key_dir = key_dir
        self._settings = settings
        self._keys: dict[tuple[str, str], _Key] = {}
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    @property
    def settings(self) -> DKIMConfig:
        return self._settings

    def update(self, settings: DKIMConfig) -> None:
        """New ``[dkim]`` settings (the config file changed); used from the next
        signature on."""
        if settings == self._settings:
            return
        log.info(
            "DKIM now signs {domains} with selector {selector}",
            domains=list(settings.domains),
            selector=settings.selector,
            event="dkim_reload",
        )
        self._settings = settings
        self.reload()

    def reload(self) -> None:
        """SIGHUP: re-read the keys before the next signature."""
        with self._lock:
            self._keys.clear()
            self._reported.clear()

    def sign(self, sender_domain: str, message: bytes) -> Deferred:
        """Deferred with the DKIM-Signature header to prepend, or ``b""``."""
        settings = self._settings
        if not settings.domains:
            return succeed(b"")  # signing is off: no thread hop per message
        d = deferToThreadPool(
            self.reactor,
            self.threadpool,
            self._sign,
            settings,
            (sender_domain or "").lower(),
            message,
        )
        return d.addErrback(self._failed)

    def sign_job(self, job) -> Deferred:
        """Like `sign`, for a queued message (an `mta.envelope.DeliveryJob`): the
        message is read through its `IMessageBody` on the thread pool, and only in
        full when a listed domain signs it.  The relay prepends the result."""
        settings = self._settings
        if not settings.domains:
            return succeed(b"")
        d = deferToThreadPool(
            self.reactor,
            self.threadpool,
            self._sign_body,
            settings,
            job.envelope.sender.domain.lower(),
            job.body,
        )
        return d.addErrback(self._failed)

    def _failed(self, failure) -> bytes:
        log.failure("DKIM signing failed; sending unsigned", failure, event="dkim_failed")
        return b""

    # -- on the thread pool --------------------------------------------------------

    def _sign(self, settings: DKIMConfig, sender_domain: str, message: bytes) -> bytes:
        domain = self._choose(settings, sender_domain, message)
        if domain is None:
            return b""
        key = self._key(domain, settings.selector)
        if key is None:
            return b""
        return sign_message(message, domain, settings.selector, key)

    def _sign_body(self, settings: DKIMConfig, sender_domain: str, body) -> bytes:
        head = body.header_block(_HEAD_READ)
        domain = self._choose(settings, sender_domain, head)
        key = None if domain is None else self._key(domain, settings.selector)
        seal = self._sealer(settings, head)
        if key is None and seal is None:
            return b""
        message = b"".join(body.chunks(_READ_CHUNK))
        signature = b"" if key is None else sign_message(message, domain, settings.selector, key)
        if seal is None:
            return signature
        return self._seal(signature + message, settings.selector, *seal) + signature

    def _sealer(self, settings: DKIMConfig, head: bytes) -> tuple[str, bytes] | None:
        """(domain, key) to ARC-seal a message with (RFC 8617), or None: sealing is
        off, or the message came in without results of ours (submitted mail, or
        mail from relay_networks: nothing to vouch for).  The seal's domain is
        the `[dkim]` domain of our host name, else the first one."""
        if not self._ours or not field_present(head, self._ours):
            return None
        if b"arc=temperror" in head:
            return None  # the chain could not be checked: no cv= to vouch for
        host = self.authserv_id.lower()
        domain = next(
            (d for d in settings.domains if host == d or host.endswith("." + d)),
            settings.domains[0],
        )
        key = self._key(domain, settings.selector)
        return None if key is None else (domain, key)

    def _seal(self, message: bytes, selector: str, domain: str, key: bytes) -> bytes:
        try:
            return arc_seal(message, domain, selector, key, self.authserv_id)
        except Exception:
            log.failure("ARC sealing failed; sending unsealed", event="arc_seal_failed")
            return b""

    @staticmethod
    def _choose(settings: DKIMConfig, sender_domain: str, message: bytes) -> str | None:
        """The signing domain for `message`, or None."""
        if not settings.domains:
            return None
        domain = from_domain(message)
        if domain not in settings.domains:
            domain = sender_domain if sender_domain in settings.domains else None
        return domain

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
