"""SASL PLAIN and LOGIN state machines (RFC 4616, RFC 4954)."""

from __future__ import annotations

import base64

import pytest

from mta.smtp import sasl
from mta.smtp.sasl import Challenge, Credentials, SASLError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error_of(call, *args) -> tuple[int, str]:
    with pytest.raises(SASLError) as info:
        call(*args)
    return info.value.reply.code, info.value.reply.enhanced


def test_plain_with_initial_response():
    out = sasl.start("plain", b64(b"\x00alice@example.test\x00s3cret"))
    assert out == Credentials("PLAIN", "alice@example.test", b"s3cret")


def test_plain_authzid_equal_to_authcid_is_accepted():
    out = sasl.start("PLAIN", b64(b"Alice@Example.test\x00alice@example.test\x00pw"))
    assert isinstance(out, Credentials) and out.authcid == "alice@example.test"


def test_plain_other_authzid_is_refused():
    code = error_of(sasl.start, "PLAIN", b64(b"bob@example.test\x00alice@example.test\x00pw"))
    assert code == (535, "5.7.8")


def test_plain_without_initial_response_sends_empty_challenge():
    out = sasl.start("PLAIN", None)
    assert isinstance(out, Challenge)
    assert out.reply.to_bytes() == b"334 \r\n"
    done = out.step(b64(b"\x00alice@example.test\x00pw").encode())
    assert done == Credentials("PLAIN", "alice@example.test", b"pw")


@pytest.mark.parametrize(
    "message",
    [b"alice\x00pw", b"\x00alice\x00pw\x00extra", b"", b"\x00\x00pw", b"\x00alice\x00"],
)
def test_plain_malformed_message(message):
    code, enhanced = error_of(sasl.start, "PLAIN", b64(message) if message else "=")
    assert (code, enhanced) == (501, "5.5.2")


@pytest.mark.parametrize("bad", ["not base64!", "YWJ", "YW Jj", "\u00e9"])
def test_malformed_base64(bad):
    assert error_of(sasl.start, "PLAIN", bad) == (501, "5.5.2")
    challenge = sasl.start("LOGIN", None)
    assert error_of(challenge.step, bad) == (501, "5.5.2")


def test_non_ascii_bytes_line_is_malformed():
    assert error_of(sasl.start("PLAIN", None).step, b"\xff\xfe") == (501, "5.5.2")


def test_invalid_utf8_identity():
    assert error_of(sasl.start, "PLAIN", b64(b"\x00\xff\x00pw")) == (501, "5.5.2")


def test_star_aborts():
    assert error_of(sasl.start("PLAIN", None).step, "*") == (501, "5.7.0")
    login = sasl.start("LOGIN", None)
    assert error_of(login.step, "*") == (501, "5.7.0")
    password = login.step(b64(b"alice@example.test"))
    with pytest.raises(SASLError) as info:
        password.step("*\r\n")
    assert info.value.reply == sasl.ABORTED
    assert str(info.value.reply) == "501 5.7.0 Authentication aborted"


def test_login_exchange():
    first = sasl.start("LOGIN", None)
    assert first.reply.to_bytes() == b"334 VXNlcm5hbWU6\r\n"  # "Username:"
    second = first.step(b64(b"alice@example.test"))
    assert second.reply.to_bytes() == b"334 UGFzc3dvcmQ6\r\n"  # "Password:"
    assert second.step(b64(b"pw")) == Credentials("LOGIN", "alice@example.test", b"pw")
    # Pure values: stepping the same challenge again gives the same answer.
    assert first.step(b64(b"bob@example.test")).step(b64(b"x")).authcid == "bob@example.test"


def test_login_with_initial_response_skips_username_challenge():
    out = sasl.start("LOGIN", b64(b"alice@example.test"))
    assert isinstance(out, Challenge)
    assert out.reply.text == b64(b"Password:")
    assert out.step(b64(b"pw")).password == b"pw"


def test_login_empty_username_or_password():
    assert error_of(sasl.start("LOGIN", None).step, "") == (501, "5.5.2")
    assert error_of(sasl.start("LOGIN", b64(b"a@b")).step, "") == (501, "5.5.2")


def test_unknown_mechanism():
    assert error_of(sasl.start, "CRAM-MD5", None) == (504, "5.5.4")


def test_parse_auth_argument():
    assert sasl.parse_auth_argument("plain AGEAYg==") == ("PLAIN", "AGEAYg==")
    assert sasl.parse_auth_argument("LOGIN") == ("LOGIN", None)
    assert error_of(sasl.parse_auth_argument, "") == (501, "5.5.4")
    assert error_of(sasl.parse_auth_argument, "PLAIN a b") == (501, "5.5.4")


def test_repr_never_shows_the_password():
    creds = sasl.start("PLAIN", b64(b"\x00alice@example.test\x00hunter2"))
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in repr(sasl.start("LOGIN", b64(b"alice@example.test")))
