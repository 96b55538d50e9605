"""mta.smtp.tls: the generated self-signed certificate follows the configured hostname;
a configured certificate is never touched."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from mta.smtp.tls import ServerTLSContext, generate_self_signed, server_context


def self_signed_paths(datadir: str) -> tuple[str, str]:
    """Where the server generates its certificate (README: <datadir>/tls/)."""
    tls = Path(datadir) / "tls"
    return str(tls / "selfsigned.crt"), str(tls / "selfsigned.key")


def certificate_names(path: str) -> set[str]:
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(san.value.get_values_for_type(x509.DNSName))


def test_generated_when_missing(tmp_path):
    context = server_context(None, None, str(tmp_path), "mx.example.test")
    cert, key = self_signed_paths(str(tmp_path))
    assert isinstance(context, ServerTLSContext)
    assert (context.cert_path, context.key_path) == (cert, key)
    assert certificate_names(cert) == {"mx.example.test"}


def test_kept_while_the_hostname_matches(tmp_path):
    server_context(None, None, str(tmp_path), "mx.example.test")
    cert, key = self_signed_paths(str(tmp_path))
    before = (open(cert, "rb").read(), open(key, "rb").read())
    server_context(None, None, str(tmp_path), "mx.example.test")
    assert (open(cert, "rb").read(), open(key, "rb").read()) == before


def test_regenerated_when_the_hostname_changed(tmp_path):
    server_context(None, None, str(tmp_path), "old.example.test")
    cert, key = self_signed_paths(str(tmp_path))
    old_key = open(key, "rb").read()
    context = server_context(None, None, str(tmp_path), "new.example.test")
    assert certificate_names(cert) == {"new.example.test"}
    assert open(key, "rb").read() != old_key
    # The new pair matches (ServerTLSContext refuses a certificate that does not).
    assert context.getContext() is not None


def test_regenerated_when_it_is_not_a_certificate(tmp_path):
    cert, key = self_signed_paths(str(tmp_path))
    server_context(None, None, str(tmp_path), "mx.example.test")
    with open(cert, "w") as f:
        f.write("not a certificate\n")
    server_context(None, None, str(tmp_path), "mx.example.test")
    assert certificate_names(cert) == {"mx.example.test"}


def test_certificate_names_reads_san_and_cn(tmp_path):
    from mta.smtp import tls

    cert, key = self_signed_paths(str(tmp_path))
    assert tls.self_signed_paths(str(tmp_path)) == (cert, key)
    assert tls.certificate_names(cert) is None  # not there
    generate_self_signed(cert, key, "Mx.Example.Test")
    assert tls.certificate_names(cert) == {"mx.example.test"}
    Path(cert).write_text("garbage\n")
    assert tls.certificate_names(cert) == frozenset()


def test_a_configured_certificate_is_never_replaced(tmp_path):
    mine = tmp_path / "etc"
    mine.mkdir()
    cert, key = str(mine / "fullchain.pem"), str(mine / "privkey.pem")
    generate_self_signed(cert, key, "other.example.test")
    before = (open(cert, "rb").read(), open(key, "rb").read())
    datadir = tmp_path / "var"
    context = server_context(cert, key, str(datadir), "mx.example.test")
    assert context.cert_path == cert
    assert (open(cert, "rb").read(), open(key, "rb").read()) == before
    assert not (datadir / "tls").exists()
