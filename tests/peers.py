"""Receiving MTAs for relay tests: tiny in-process Twisted SMTP servers and a private Postfix.

`start_peer(reactor, PeerConfig(...))` listens on an ephemeral 127.0.0.1 port with an
SMTP server whose answers the test chooses: a 4xx or 5xx to MAIL or RCPT, a reply to
the end of data, closing the connection in the middle of DATA, STARTTLS with a
self-signed certificate.  Each `Peer` records what it received (`peer.messages`:
envelope, content (dot-unstuffed), whether TLS was on) and the commands it saw.  It
runs on the test process's reactor, so tests wait for it asynchronously.

`PostfixPeer(root)` is a private Postfix instance (its own config, queue and data
directories under `root`; the system Postfix is never touched) whose smtpd listens
on a loopback port and stores mail for `domains` as Maildir files under
`root/mail/<domain>/<local>/` (`smtputf8=False`: a server without SMTPUTF8).
Started and stopped by its own `postfix -c`, waiting (bounded) for the greeting and
for master's pid to go away.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs
from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver


@attrs.define
class PeerConfig:
    hostname: str = "peer.test"
    greeting: bytes = b"220 peer.test ESMTP ready"
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SIZE 10485760", "SMTPUTF8")
    ehlo_reply: bytes | None = None  # e.g. b"502 5.5.1 no EHLO"
    mail_reply: bytes = b"250 2.1.0 ok"
    rcpt_reply: bytes = b"250 2.1.5 ok"
    rcpt_replies: dict = attrs.Factory(dict)  # address -> reply, overrides rcpt_reply
    data_reply: bytes = b"354 go ahead"
    final_reply: bytes | None = b"250 2.0.0 queued"  # None: never answer (a hung peer)
    close_after_data_bytes: int | None = None  # drop the connection mid-DATA
    tls_context: object = None  # offer STARTTLS with this server context


@attrs.define(eq=False)
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    tls: bool


class PeerSMTP(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, peer: Peer):
        self.peer = peer
        self.config = peer.config
        self.tls = False
        self._reset()
        self._data: list[bytes] | None = None
        self._data_bytes = 0

    def _reset(self):
        self.sender = None
        self.rcpts: list[str] = []

    def connectionMade(self):
        self.peer.connections += 1
        self.sendLine(self.config.greeting)

    def lineReceived(self, line: bytes):
        if self._data is not None:
            self._data_bytes += len(line) + 2
            limit = self.config.close_after_data_bytes
            if limit is not None and self._data_bytes >= limit:
                self.transport.abortConnection()
                return
            if line == b".":
                content = b"".join(ln + b"\r\n" for ln in self._data)
                self._data = None
                self.peer.messages.append(
                    Received(self.sender, list(self.rcpts), content, self.tls)
                )
                self._reset()
                if self.config.final_reply is not None:
                    self.sendLine(self.config.final_reply)
                return
            self._data.append(line[1:] if line.startswith(b".") else line)
            return
        self.peer.commands.append(line)
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        c = self.config
        if verb == b"EHLO":
            if c.ehlo_reply:
                self.sendLine(c.ehlo_reply)
                return
            exts = list(c.extensions)
            if c.tls_context is not None and not self.tls:
                exts.append("STARTTLS")
            lines = [c.hostname.encode(), *(e.encode() for e in exts)]
            out = [b"250-" + x for x in lines[:-1]] + [b"250 " + lines[-1]]
            self.transport.write(b"\r\n".join(out) + b"\r\n")
        elif verb == b"HELO":
            self.sendLine(b"250 " + c.hostname.encode())
        elif verb == b"STARTTLS" and c.tls_context is not None and not self.tls:
            self.sendLine(b"220 2.0.0 ready to start TLS")
            self.transport.startTLS(c.tls_context)
            self.tls = True
            self._reset()
        elif verb == b"MAIL":
            if c.mail_reply.startswith(b"2"):
                self.sender = line.split(b":", 1)[1].split(b" ")[0].strip(b"<>").decode()
            self.sendLine(c.mail_reply)
        elif verb == b"RCPT":
            addr = line.split(b":", 1)[1].split(b" ")[0].strip(b"<>").decode()
            if self.sender is None:
                self.sendLine(b"503 5.5.1 MAIL first")
                return
            reply = c.rcpt_replies.get(addr, c.rcpt_reply)
            if reply.startswith(b"2"):
                self.rcpts.append(addr)
            self.sendLine(reply)
        elif verb == b"DATA":
            if not self.rcpts:
                self.sendLine(b"503 5.5.1 no valid recipients")
                return
            self.sendLine(c.data_reply)
            if c.data_reply.startswith(b"354"):
                self._data = []
                self._data_bytes = 0
        elif verb == b"RSET":
            self._reset()
            self.sendLine(b"250 2.0.0 ok")
        elif verb == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        elif verb == b"NOOP":
            self.sendLine(b"250 2.0.0 ok")
        else:
            self.sendLine(b"502 5.5.2 unknown command")


@attrs.define(eq=False)
class Peer:
    config: PeerConfig
    port: int = 0
    listening: object = None
    messages: list[Received] = attrs.Factory(list)
    commands: list[bytes] = attrs.Factory(list)
    connections: int = 0

    def stop(self):
        return self.listening.stopListening()


def start_peer(
    reactor, config: PeerConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Peer:
    peer = Peer(config or PeerConfig())
    factory = protocol.Factory.forProtocol(lambda: PeerSMTP(peer))
    peer.listening = reactor.listenTCP(port, factory, interface=host)
    peer.port = peer.listening.getHost().port
    return peer


def self_signed_server_context(directory: Path, hostname: str = "peer.test"):
    """A server TLS context with a freshly generated self-signed certificate."""
    from mta.smtp.tls import server_context

    directory.mkdir(parents=True, exist_ok=True)
    return server_context(None, None, str(directory), hostname)


# --------------------------------------------------------------------------- Postfix

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixPeer:
    """A private Postfix on 127.0.0.1:`port` storing mail for `domains` in Maildirs."""

    def __init__(
        self,
        root: Path,
        port: int,
        domains: tuple[str, ...] = ("dest.test",),
        *,
        smtputf8: bool = True,
    ):
        self.root = root
        self.port = port
        self.domains = domains
        self.smtputf8 = smtputf8  # False: smtputf8_enable = no (no SMTPUTF8 offered)
        self.etc = root / "etc"
        self.mail = root / "mail"
        self.started = False

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.mail / domain / local

    def _write_config(self) -> None:
        for d in ("etc", "spool", "data", "mail"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # postfix and nobody must reach data/ and mail/
        uid = pwd.getpwnam("nobody").pw_uid
        gid = grp.getgrnam("nogroup").gr_gid
        os.chown(self.root / "data", pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        os.chown(self.mail, uid, gid)
        r = self.root
        main = f"""\
compatibility_level = 3.6
config_directory = {r}/etc
queue_directory = {r}/spool
data_directory = {r}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {r}
maillog_file = {r}/maillog
myhostname = postfix.dest.test
mydomain = dest.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_transport = error:no outbound mail from this test instance
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {" ".join(self.domains)}
virtual_mailbox_base = {r}/mail
virtual_mailbox_maps = texthash:{r}/etc/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
biff = no
alias_maps =
alias_database =
local_recipient_maps =
append_dot_mydomain = no
smtputf8_enable = {"yes" if self.smtputf8 else "no"}
"""
        (self.etc / "main.cf").write_text(main)
        (self.etc / "vmailbox").write_text("".join(f"@{d}  {d}/catchall/\n" for d in self.domains))
        (self.etc / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        # postfix(1) stalls when main.cf changed within the last seconds: backdate it.
        past = time.time() - 10
        for name in ("main.cf", "master.cf", "vmailbox"):
            os.utime(self.etc / name, (past, past))

    def start(self, timeout: float = 30.0) -> PostfixPeer:
        self._write_config()
        done = subprocess.run(
            ["postfix", "-c", str(self.etc), "start"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"postfix start failed: {done.stdout}{done.stderr}{self.log()}")
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postfix on port {self.port} not ready:\n{self.log()}")

    def _master_pid(self) -> int | None:
        try:
            return int((self.root / "spool" / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 30.0) -> None:
        if not self.started:
            return
        pid = self._master_pid()
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        self.started = False
        deadline = time.monotonic() + timeout
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return "<no maillog>"

    def messages(self, address: str) -> list[bytes]:
        """Maildir files delivered for `address`'s domain (catch-all mailbox)."""
        local, _, domain = address.rpartition("@")
        new = self.mail / domain / "catchall" / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]


def postfix_available() -> bool:
    return shutil.which("postfix") is not None or os.path.exists("/usr/sbin/postfix")
