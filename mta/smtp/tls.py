"""TLS server contexts: the configured certificate or a generated self-signed one.

The generated one lives in `<datadir>/tls/selfsigned.{crt,key}` and is made for the
configured `hostname`; when that changes (or the file is not a certificate) it is made
again at start.  A configured `[tls]` certificate is never touched.

TLS 1.2 is the minimum and the cipher list is Twisted's modern default (forward-secret
AEAD suites).  The context is reloadable: `reload()` reads the files again and new
handshakes use the new certificate while established connections keep theirs, which
is what a SIGHUP after certificate renewal needs.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from mta.observe.logging import Logger

log = Logger()


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def generate_self_signed(cert_path: str, key_path: str, hostname: str) -> None:
    """Write a self-signed ECDSA P-256 certificate for `hostname` (mode 0600 key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(cert_path) or ".", exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    os.replace(key_path + ".tmp", key_path)
    with open(cert_path + ".tmp", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(cert_path + ".tmp", cert_path)


def _load_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
    except OSError as e:
        raise TLSSetupError(f"{cert_path}: cannot read certificate: {e.strerror}") from None
    try:
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise TLSSetupError(f"{key_path}: cannot read key: {e.strerror}") from None
    try:
        certs = (
            x509.load_pem_x509_certificates(cert_pem)
            if hasattr(x509, "load_pem_x509_certificates")
            else [x509.load_pem_x509_certificate(cert_pem)]
        )
    except Exception as e:
        raise TLSSetupError(f"{cert_path}: invalid PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except Exception as e:
        raise TLSSetupError(f"{key_path}: invalid PEM private key: {e}") from None
    try:
        return ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(certs[0]),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in certs[1:]],
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    except Exception as e:
        raise TLSSetupError(f"{cert_path}: certificate does not match key: {e}") from None


@implementer(IOpenSSLContextFactory)
class ServerTLSContext:
    """A context factory (`getContext()`) that can be reloaded in place."""

    def __init__(self, cert_path: str, key_path: str):
        self.cert_path = cert_path
        self.key_path = key_path
        self._options = _load_options(cert_path, key_path)
        self._context = self._options.getContext()

    def getContext(self):
        return self._context

    def reload(self) -> bool:
        """Re-read the files; on error keep the current certificate and log."""
        try:
            options = _load_options(self.cert_path, self.key_path)
            context = options.getContext()
        except TLSSetupError as e:
            log.error("TLS reload failed, keeping the old certificate: {error}", error=str(e))
            return False
        self._options, self._context = options, context
        log.info("TLS certificate reloaded from {cert}", cert=self.cert_path)
        return True


def server_context(
    cert_path: str | None, key_path: str | None, datadir: str, hostname: str
) -> ServerTLSContext:
    """The configured certificate, or a self-signed one generated into `<datadir>/tls/`."""
    if cert_path or key_path:
        if not (cert_path and key_path):
            raise TLSSetupError("[tls] needs both certificate and key")
        return ServerTLSContext(cert_path, key_path)
    cert, key = self_signed_paths(datadir)
    if not (os.path.exists(cert) and os.path.exists(key)):
        log.info(
            "generating a self-signed certificate for {hostname} in {path}",
            hostname=hostname,
            path=cert,
            event="tls_self_signed",
        )
        generate_self_signed(cert, key, hostname)
    else:
        names = certificate_names(cert)
        if names is not None and hostname.lower() not in names:
            log.info(
                "the self-signed certificate {path} is for {names}, not {hostname}: generating a new one",
                path=cert,
                names=sorted(names),
                hostname=hostname,
                event="tls_self_signed",
            )
            generate_self_signed(cert, key, hostname)
    return ServerTLSContext(cert, key)


def self_signed_paths(datadir: str) -> tuple[str, str]:
    """Where the generated certificate and its key live: `<datadir>/tls/selfsigned.*`."""
    directory = os.path.join(datadir, "tls")
    return os.path.join(directory, "selfsigned.crt"), os.path.join(directory, "selfsigned.key")


def certificate_names(cert_path: str) -> frozenset[str] | None:
    """The DNS names (subjectAltName and CN, lower case) of the first certificate in
    `cert_path`: an empty set when it is not a PEM certificate, None when unreadable."""
    try:
        with open(cert_path, "rb") as f:
            pem = f.read()
    except OSError:
        return None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except Exception:
        return frozenset()
    names = {
        str(attribute.value).lower()
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        pass
    else:
        names.update(name.lower() for name in san.value.get_values_for_type(x509.DNSName))
    return frozenset(names)


def describe_tls(transport) -> str | None:
    """`TLSv1.3:TLS_AES_256_GCM_SHA384` for the Received header, or None if plain."""
    handle = getattr(transport, "getHandle", None)
    conn = handle() if handle else None
    if conn is None or not hasattr(conn, "get_cipher_name"):
        return None
    try:
        version = conn.get_protocol_version_name()
        cipher = conn.get_cipher_name()
    except Exception:
        return None
    if not cipher:
        return None
    return f"{version}:{cipher}"
