"""Zones and keys for the sender-authentication tests: SPF, DKIM (RSA and Ed25519 keys
made here), DMARC and ARC records on the real twisted.names server of
tests/dnsserver.py, and an `AuthDNS` pointed at it.

The server runs on the test's reactor while pyspf and dkimpy block, so tests run
the blocking calls in a thread (`in_thread`) and wait for them asynchronously.
"""

from __future__ import annotations

import base64

import attrs
import dkim
import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, threads
from twisted.names import common, dns

from mta.config import DNSConfig
from mta.dns import make_dnspython_resolver
from mta.policy.authdns import AuthDNS
from tests.dnsserver import start_dns_server

CLIENT = "127.0.0.1"  # the address the SMTP client comes from in every test
OTHER = "192.0.2.1"
HOSTNAME = "mx.receiver.test"


@attrs.frozen
class Key:
    selector: str
    domain: str
    private: bytes  # what dkimpy signs with
    record: str  # the TXT record published at <selector>._domainkey.<domain>
    algorithm: bytes = b"rsa-sha256"

    def sign(self, message: bytes, *, arc=False, srv_id=b"", **kw) -> bytes:
        if arc:
            fields = dkim.arc_sign(
                message,
                self.selector.encode(),
                self.domain.encode(),
                self.private,
                srv_id,
            )
            return b"".join(fields) + message
        signature = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private,
            signature_algorithm=self.algorithm,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
            **kw,
        )
        return signature + message


_RSA_CACHE: dict = {}


def rsa_key(selector: str, domain: str, bits: int = 2048) -> Key:
    private = _RSA_CACHE.get(bits)
    if private is None:
        private = _RSA_CACHE[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    return Key(selector, domain, pem, record)


def ed25519_key(selector: str, domain: str) -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = "v=DKIM1; k=ed25519; p=" + base64.b64encode(public).decode()
    return Key(selector, domain, base64.b64encode(seed), record, b"ed25519-sha256")


def publish(zone, key: Key) -> None:
    text = key.record
    zone.txt(
        f"{key.selector}._domainkey.{key.domain}",
        *[text[i : i + 250] for i in range(0, len(text), 250)],
    )


@attrs.define
class AuthZones:
    server: object
    zones: dict
    keys: dict

    @property
    def address(self) -> str:
        return self.server.address

    def dns(self, timeout: float = 5.0) -> AuthDNS:
        return AuthDNS(make_dnspython_resolver(DNSConfig((self.address,), timeout)))


def message(
    from_addr: str = "Alice <alice@example.test>", subject: str = "hello", extra: bytes = b""
) -> bytes:
    return (
        extra
        + (
            f"From: {from_addr}\r\n"
            "To: bob@receiver.test\r\n"
            f"Subject: {subject}\r\n"
            "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
            "Message-ID: <m1@example.test>\r\n"
            "\r\n"
            "Hello Bob,\r\n\r\nthis is the body.\r\n"
        ).encode()
    )


def in_thread(f, *args, **kw):
    return threads.deferToThread(f, *args, **kw)


SPF_RECORDS = {
    "example.test": "v=spf1 ip4:127.0.0.1 -all",
    "fail.test": "v=spf1 ip4:192.0.2.1 -all",
    "soft.test": "v=spf1 ip4:192.0.2.1 ~all",
    "neutral.test": "v=spf1 ?all",
    "perm.test": "v=spf1 ip4:not-an-address -all",
    # 11 DNS mechanisms: one more than RFC 7208 4.6.4 allows
    "many.test": "v=spf1 " + " ".join(f"a:h{i}.many.test" for i in range(11)) + " -all",
    "temp.test": "v=spf1 include:broken.servfail.test -all",  # SERVFAIL
    "helo.test": "v=spf1 ip4:127.0.0.1 -all",
    "mail.sub.parent.test": "v=spf1 ip4:127.0.0.1 -all",
    "bounce.example.test": "v=spf1 ip4:127.0.0.1 -all",
    "other-org.test": "v=spf1 ip4:127.0.0.1 -all",
}

DMARC_RECORDS = {
    "example.test": "v=DMARC1; p=reject; rua=mailto:d@example.test",
    "fail.test": "v=DMARC1; p=reject",
    "soft.test": "v=DMARC1; p=quarantine",
    "neutral.test": "v=DMARC1; p=none",
    "strict.test": "v=DMARC1; p=reject; adkim=s; aspf=s",
    "parent.test": "v=DMARC1; p=none; sp=reject",
    "pct.test": "v=DMARC1; p=reject; pct=0",
    "quar.test": "v=DMARC1; p=quarantine",
}


class ServfailAuthority(common.ResolverBase):
    """Answers SERVFAIL for every name under `origin` (a broken authority); other
    names are not its business (DomainError: the server asks the next zone)."""

    def __init__(self, origin: str):
        super().__init__()
        self.origin = origin

    def _lookup(self, name, cls, type, timeout=None):
        text = name.decode("ascii") if isinstance(name, bytes) else str(name)
        if text.lower().rstrip(".").endswith(self.origin):
            return defer.fail(RuntimeError(f"simulated failure for {text}"))
        return defer.fail(dns.DomainError(text))


def build_zones(reactor) -> AuthZones:
    server = start_dns_server(reactor)
    server.factory.resolver.resolvers.insert(0, ServfailAuthority("servfail.test"))
    zones = {}
    for name in (
        "example.test",
        "fail.test",
        "soft.test",
        "neutral.test",
        "none.test",
        "perm.test",
        "many.test",
        "temp.test",
        "helo.test",
        "strict.test",
        "parent.test",
        "pct.test",
        "quar.test",
        "forwarder.test",
        "other-org.test",
    ):
        zones[name] = zone = server.zone(name)
        zone.a(name, OTHER)
    for domain, text in SPF_RECORDS.items():
        zone = zones[next(z for z in zones if domain == z or domain.endswith("." + z))]
        zone.txt(domain, text)
    for i in range(11):
        zones["many.test"].a(f"h{i}.many.test", OTHER)
    for domain, text in DMARC_RECORDS.items():
        zones[domain].txt(f"_dmarc.{domain}", text)
    keys = {
        "rsa": rsa_key("sel", "example.test"),
        "ed": ed25519_key("ed", "example.test"),
        "strict-sub": rsa_key("sel", "mail.strict.test"),
        "strict": rsa_key("sel", "strict.test"),
        "parent": rsa_key("sel", "parent.test"),
        "forwarder": rsa_key("arc", "forwarder.test"),
        "other": rsa_key("sel", "other-org.test"),
        # signed with, but never published
        "unpublished": rsa_key("gone", "example.test"),
    }
    for name, key in keys.items():
        if name == "unpublished":
            continue
        zone = zones[next(z for z in zones if key.domain == z or key.domain.endswith("." + z))]
        publish(zone, key)
    return AuthZones(server, zones, keys)


@pytest.fixture(scope="module")
def auth_zones():
    from twisted.internet import reactor

    built = build_zones(reactor)
    yield built
    pytest_twisted.blockon(built.server.stop())
