"""The manhole: an SSH console into the running server (twisted.conch).

`[manhole] address` (loopback only, enforced by mta.config) and `authorized_keys`
(OpenSSH format, re-read at every login so a removed key stops working at once).
Public keys are the only authentication method offered.  The host key is generated
once into ``<datadir>/manhole/ssh_host_key`` (Ed25519, mode 0600).

An interactive login (``ssh -p PORT mta@127.0.0.1``, with a pty) gets twisted.conch's
Python prompt; a command (``ssh ... 'stats()'``) is evaluated once, its value printed
with pprint, and the exit status is 0, or 1 after a traceback on stderr — something
the stock manhole refuses ("Cannot execute commands").  A Deferred result is waited
for.  Code runs on the reactor thread: a slow expression stalls the server, as in
every manhole.

Every successful login is written to the audit log (`record_login`, which the
composition root runs in a thread) *before* the session starts: when the row cannot
be written, the login fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import pprint
import traceback
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import service
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import (
    IAuthorizedKeysDB,
    SSHPublicKeyChecker,
    readAuthorizedKeyFile,
)
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import connection, keys, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.observe.logging import Logger

log = Logger()

EXEC_TIMEOUT = 60.0


# -- keys -----------------------------------------------------------------------------


def ensure_host_key(path: str) -> keys.Key:
    """The host key at `path`, generated (Ed25519, 0600, directory 0700) if missing."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        private = ed25519.Ed25519PrivateKey.generate()
        data = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        log.info("generated manhole host key {path}", path=path, event="manhole_host_key")
    return keys.Key.fromFile(path)


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """Every key in `path` may log in, under any user name.  Read at each login (a
    tiny local file), so edits take effect without a restart."""

    def __init__(self, path: str):
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        try:
            with open(self.path, "rb") as f:
                return list(readAuthorizedKeyFile(f))
        except OSError as e:
            log.error(
                "cannot read manhole authorized_keys {path}: {error}",
                path=self.path,
                error=e.strerror,
            )
            return []


# -- sessions ----------------------------------------------------------------------


class ManholeSession(manhole_ssh.TerminalSession):
    """A TerminalSession that also runs one command (``ssh host 'expr'``)."""

    def __init__(self, original, namespace: dict[str, Any], reactor):
        super().__init__(original)
        self.namespace = namespace
        self.reactor = reactor
        self.height, self.width = 25, 80
        self._terminal = None

    def openShell(self, proto) -> None:
        self._terminal = self.chainedProtocolFactory()
        self.transportFactory(
            proto, self._terminal, IConchUser(self.original), self.width, self.height
        )

    def windowChanged(self, newWindowSize) -> None:
        self.height, self.width = newWindowSize[:2]
        if self._terminal is not None and self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        pass

    def execCommand(self, proto, cmd: bytes) -> None:
        # The SSH session talks to `proto` as to a process: give it a process
        # transport that takes (and drops) stdin; Twisted 22.4 needs one to close.
        proto.makeConnection(_NoProcess())
        # After the channel request has been answered, not inside it.
        self.reactor.callLater(0, self._run, proto, cmd.decode("utf-8", "replace"))

    def _run(self, proto, source: str) -> None:
        try:
            result = evaluate(source, self.namespace)
        except BaseException:
            self._end(proto, traceback.format_exc(), 1)
            return
        if not isinstance(result.value, defer.Deferred):
            self._end(proto, result.text, 0)
            return
        d = result.value
        d.addTimeout(EXEC_TIMEOUT, self.reactor)
        d.addCallbacks(
            lambda value: self._end(proto, result.output + _shown(value), 0),
            lambda f: self._end(proto, result.output + f.getTraceback(), 1),
        )

    @staticmethod
    def _end(proto, text: str, status: int) -> None:
        data = text.encode("utf-8", "replace")
        if status:
            proto.errReceived(data)
            reason = Failure(ProcessTerminated(exitCode=status))
        else:
            if data:
                proto.outReceived(data)
            reason = Failure(ProcessDone(0))
        proto.processEnded(reason)


class _NoProcess:
    """The 'process' behind an exec channel: the command ran in-process already."""

    pid = None

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, seq) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def signalProcess(self, signal) -> None:
        pass


class Evaluated:
    def __init__(self, value: Any, output: str):
        self.value = value
        self.output = output

    @property
    def text(self) -> str:
        return self.output + _shown(self.value)


def _shown(value: Any) -> str:
    return "" if value is None else pprint.pformat(value, width=100) + "\n"


def evaluate(source: str, namespace: dict[str, Any]) -> Evaluated:
    """Evaluate an expression (or run statements) in `namespace`, capturing print()."""
    out = io.StringIO()
    try:
        code = compile(source, "<manhole>", "eval")
    except SyntaxError:
        code = compile(source, "<manhole>", "exec")
    with contextlib.redirect_stdout(out):
        value = eval(code, namespace)  # noqa: S307 - the manhole's whole purpose
    return Evaluated(value, out.getvalue())


@implementer(IRealm)
class ManholeRealm:
    """Avatars: a conch user whose session is a `ManholeSession` over `namespace`."""

    def __init__(self, namespace: dict[str, Any], reactor):
        self.namespace = namespace
        self.reactor = reactor

    def _terminal(self):
        return insults.ServerProtocol(manhole.ColoredManhole, self.namespace)

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IConchUser not in interfaces:
            raise NotImplementedError("the manhole offers only SSH sessions")
        comp = components.Componentized()
        user = manhole_ssh.TerminalUser(comp, avatarId)
        user.username = avatarId
        sess = ManholeSession(comp, self.namespace, self.reactor)
        sess.transportFactory = manhole_ssh.TerminalSessionTransport
        sess.chainedProtocolFactory = self._terminal
        comp.setComponent(IConchUser, user)
        comp.setComponent(ISession, sess)
        return IConchUser, user, lambda: None


# -- authentication with an audit trail -----------------------------------------


def key_fingerprint(blob: bytes) -> str:
    try:
        return keys.Key.fromString(blob).fingerprint(keys.FingerprintFormats.SHA256_BASE64)
    except Exception:
        return "unknown"


class _AuditedUserAuth(userauth.SSHUserAuthServer):
    """Public-key userauth that records each successful login before granting it."""

    def tryAuth(self, kind, user, data):
        d = super().tryAuth(kind, user, data)
        if kind != b"publickey":
            return d
        _, blob, _ = getNS(data[1:], 2)
        fingerprint = key_fingerprint(blob)
        peer = self.transport.transport.getPeer()
        client = getattr(peer, "host", str(peer))
        username = user.decode("utf-8", "replace")

        def granted(result):
            log.info(
                "manhole login by {username} from {client} with key {key}",
                username=username,
                client=client,
                key=fingerprint,
                event="manhole_login",
            )
            record = self.transport.factory.record_login
            return defer.maybeDeferred(record, username, client, fingerprint).addCallback(
                lambda _: result
            )

        def refused(f):
            if f.check(UnauthorizedLogin):
                log.info(
                    "manhole login refused for {username} from {client} (key {key})",
                    username=username,
                    client=client,
                    key=fingerprint,
                    event="manhole_refused",
                )
            return f

        return d.addCallbacks(granted, refused)


class ManholeFactory(manhole_ssh.ConchFactory):
    """ConchFactory with our host key, public keys only, and the audited userauth."""

    def __init__(self, portal: Portal, host_key: keys.Key, record_login: Callable[..., Any]):
        super().__init__(portal)
        name = host_key.sshType()
        self.publicKeys = {name: host_key.public()}
        self.privateKeys = {name: host_key}
        self.services = {
            b"ssh-userauth": _AuditedUserAuth,
            b"ssh-connection": connection.SSHConnection,
        }
        self.record_login = record_login


def make_factory(
    namespace: dict[str, Any],
    authorized_keys: str,
    host_key_path: str,
    record_login: Callable[[str, str, str], Any],
    reactor,
) -> ManholeFactory:
    portal = Portal(ManholeRealm(namespace, reactor))
    portal.registerChecker(SSHPublicKeyChecker(AuthorizedKeysFile(authorized_keys)))
    return ManholeFactory(portal, ensure_host_key(host_key_path), record_login)


class ManholeService(service.Service):
    """Listens on `host`:`port` (0 picks one: `.port.getHost()`)."""

    name = "manhole"

    def __init__(self, host: str, port: int, factory: ManholeFactory, reactor):
        self.host = host
        self.portnum = port
        self.factory = factory
        self.reactor = reactor
        self.port = None

    def startService(self) -> None:
        self.port = self.reactor.listenTCP(self.portnum, self.factory, interface=self.host)
        super().startService()
        log.info("manhole (SSH) on {host}:{port}", host=self.host, port=self.port.getHost().port)

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None


# -- the namespace --------------------------------------------------------------------


def describe_session(session: Any) -> dict[str, Any]:
    try:
        listener = session.factory.context.listener.name
    except AttributeError:
        listener = None
    return {
        "client": getattr(session, "peer_ip", None),
        "listener": listener,
        "helo": getattr(session, "helo_name", None),
        "tls": bool(getattr(session, "tls_active", False)),
        "authenticated_as": getattr(session, "authenticated_as", None),
    }


def make_namespace(root: Any, registry: Any, reactor, stats: Callable[[], Any]) -> dict[str, Any]:
    """What a manhole user finds: the service tree and a few helpers."""

    def sessions() -> list[dict[str, Any]]:
        tracker = root.tracker
        return [describe_session(s) for s in list(getattr(tracker, "sessions", ()))]

    def queue() -> dict[str, Any]:
        runner, spool = root.runner, root.spool
        return {
            "depth": runner.depth() if runner is not None else {},
            "backlog": spool.backlog() if spool is not None else 0,
            "runner_running": bool(runner is not None and runner.running),
        }

    return {
        "root": root,
        "config": root.config,
        "spool": root.spool,
        # IQueueControl: list(), show(qid), act("hold", qid) ... (blocking, quick)
        "queue_control": getattr(root, "queue_control", None),
        "store": getattr(root, "store", None),
        "runner": root.runner,
        "tracker": root.tracker,
        "directory": root.directory,
        "registry": registry,
        "reactor": reactor,
        "sessions": sessions,
        "queue": queue,
        "stats": stats,
        "__name__": "__manhole__",
    }
