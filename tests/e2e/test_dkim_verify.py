"""Our DKIM signatures verify with independent verifiers that look the key up in a
real DNS server: Perl's Mail::DKIM and OpenDKIM (``opendkim -t`` through libunbound
forwarding to the server).  The DNS server is twisted.names, authoritative for
``example.test``, on an ephemeral loopback port in this process; the verifiers run as
subprocesses waited for asynchronously so the reactor keeps answering them.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer, error, utils
from twisted.names import authority, dns, server

from mta.admin import dkim as keys
from mta.config import load_config
from mta.delivery.dkim import DKIMSigner
from tests.conftest import require_tool

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@remote.test>\r\n"
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?= from the test\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <e2e-1@example.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"a line with trailing spaces   \r\n"
    b"\r\n\r\n"
)

# Verifies with Mail::DKIM, Net::DNS pointed at our server (no system resolver).
VERIFY_PL = r"""
use strict; use warnings;
use Net::DNS; use Mail::DKIM; use Mail::DKIM::Verifier;
my ($file, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
    recurse => 0, searchlist => [], udp_timeout => 5, tcp_timeout => 5, retry => 2));
my $v = Mail::DKIM::Verifier->new();
open(my $fh, '<', $file) or die "$file: $!";
while (<$fh>) { s/\r?\n\z/\015\012/; $v->PRINT($_); }
$v->CLOSE;
print "result=", $v->result, " detail=", $v->result_detail, "\n";
"""


class Zone(authority.FileAuthority):
    """example.test with the records the test sets (FileAuthority without a file)."""

    def __init__(self, origin: str):
        super().__init__(origin)

    def loadFile(self, origin):
        soa = dns.Record_SOA(
            mname=f"ns.{origin}", rname=f"hostmaster.{origin}", serial=1, minimum=60, ttl=60
        )
        key = origin.encode("ascii") if isinstance(origin, str) else origin
        self.soa = (key, soa)
        self.records = {key: [soa]}

    def txt(self, name: str, value: str) -> None:
        strings = [value[i : i + 255].encode("ascii") for i in range(0, len(value), 255)]
        self.records.setdefault(name.lower().encode("ascii"), []).append(
            dns.Record_TXT(*strings, ttl=60)
        )
        self._cache = {}


def listen_dns(reactor, zone):
    """UDP and TCP on the same ephemeral port; retries when TCP's half is taken."""
    factory = server.DNSServerFactory(authorities=[zone])
    for _ in range(20):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            tcp = reactor.listenTCP(port, factory, interface="127.0.0.1")
        except error.CannotListenError:
            udp.stopListening()
            continue
        return port, [udp, tcp]
    raise RuntimeError("no free port for the DNS server")


@pytest.fixture
def signed(tmp_path):
    """(path of a signed message, public key) for example.test, selector s1."""
    cfg = tmp_path / "mta.toml"
    cfg.write_text(
        f'datadir = "{tmp_path / "var"}"\n[dkim]\nselector = "s1"\ndomains = ["example.test"]\n'
    )
    config = load_config(str(cfg))
    pem, public = keys.generate_key(2048)
    keys.write_key(config.path("dkim"), "example.test", "s1", pem)
    return config, public


class InlinePool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            on_result(True, f(*args, **kwargs))
        except BaseException:
            from twisted.python.failure import Failure

            on_result(False, Failure())


async def _sign_and_serve(reactor, tmp_path, signed, selector="s1"):
    config, public = signed
    signer = DKIMSigner(config.dkim, config.path("dkim"), InlinePool(), reactor)
    header = await signer.sign("example.test", MESSAGE)
    assert header.startswith(b"DKIM-Signature:")
    path = tmp_path / "signed.eml"
    path.write_bytes(header + MESSAGE)
    zone = Zone("example.test")
    zone.txt(f"{selector}._domainkey.example.test", keys.txt_value(public))
    port, ports = listen_dns(reactor, zone)
    return path, port, ports


async def _run(executable, args, env=None):
    from twisted.internet import reactor

    out, err, code = await utils.getProcessOutputAndValue(
        executable, args, env=env or dict(os.environ), reactor=reactor
    )
    return out.decode(errors="replace") + err.decode(errors="replace"), code


@pytest_twisted.ensureDeferred
async def test_mail_dkim_verifies_our_signature(tmp_path, signed):
    from twisted.internet import reactor

    perl = require_tool("perl")
    if os.environ.get("CI") is None:
        code = os.system(f"{perl} -MMail::DKIM -MNet::DNS -e 1 2>/dev/null")
        if code:
            pytest.skip("Mail::DKIM is not installed (.ci/apt/dkim.txt: libmail-dkim-perl)")
    path, port, ports = await _sign_and_serve(reactor, tmp_path, signed)
    script = tmp_path / "verify.pl"
    script.write_text(VERIFY_PL)
    try:
        output, code = await _run(perl, [str(script), str(path), str(port)])
        assert code == 0, output
        assert "result=pass" in output, output
        # Tampering is detected by the same verifier (so "pass" means something).
        path.write_bytes(path.read_bytes().replace(b"Hello Bob", b"Hello Eve"))
        output, code = await _run(perl, [str(script), str(path), str(port)])
        assert "result=fail" in output, output
    finally:
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


@pytest_twisted.ensureDeferred
async def test_opendkim_verifies_our_signature(tmp_path, signed):
    from twisted.internet import reactor

    opendkim = require_tool("opendkim")
    path, port, ports = await _sign_and_serve(reactor, tmp_path, signed)
    (tmp_path / "unbound.conf").write_text(
        "server:\n"
        "    do-not-query-localhost: no\n"
        '    module-config: "iterator"\n'
        '    local-zone: "test." nodefault\n'
        "forward-zone:\n"
        '    name: "."\n'
        f"    forward-addr: 127.0.0.1@{port}\n"
    )
    (tmp_path / "opendkim.conf").write_text(
        "Mode v\n"
        "Syslog no\n"
        "LogWhy yes\n"
        f"ResolverConfiguration {tmp_path / 'unbound.conf'}\n"
        "AlwaysAddARHeader yes\n"
        "AuthservID verify.example.test\n"
    )
    try:
        output, code = await _run(
            opendkim, ["-x", str(tmp_path / "opendkim.conf"), "-t", str(path)]
        )
        assert "verification (s=s1, d=example.test, 2048-bit key) succeeded" in output, output
        path.write_bytes(path.read_bytes().replace(b"Hello Bob", b"Hello Eve"))
        output, code = await _run(
            opendkim, ["-x", str(tmp_path / "opendkim.conf"), "-t", str(path)]
        )
        assert "succeeded" not in output and "verification" in output, output
        print(output)
    finally:
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
