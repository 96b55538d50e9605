"""Downgrading UTF-8 header fields (RFC 6532 -> RFC 2047/2231) for a peer without
SMTPUTF8, and the streamed downgraded message."""

from __future__ import annotations

import email
import email.policy
import os

import pytest
from zope.interface.verify import verifyObject

from mta.delivery.downgrade import (
    DowngradedBody,
    DowngradeError,
    downgrade_body,
    downgrade_headers,
    encoded_words,
)
from mta.interfaces import IMessageBody
from mta.queue.body import FileBody

TRACE = b"Received: from client by mx.example.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"


def parse(headers: bytes):
    return email.message_from_bytes(headers + b"\r\n", policy=email.policy.default)


def lines(block: bytes) -> list[bytes]:
    return block.split(b"\r\n")[:-1]


def test_ascii_fields_are_kept_byte_for_byte():
    block = (
        b"Received: from a\r\n\tby b; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        b"Subject:  two  spaces\r\n" + "X-Note: caf\u00e9\r\n".encode() + b"To: bob@plain.test\r\n"
    )
    out = downgrade_headers(block)
    assert out.startswith(b"Received: from a\r\n\tby b; Thu, 1 Jan 2026 00:00:00 +0000\r\n")
    assert (
        b"Subject:  two  spaces\r\nX-Note: =?utf-8?q?caf=C3=A9?=\r\nTo: bob@plain.test\r\n" in out
    )


def test_unstructured_fields_become_encoded_words_that_decode_back():
    subject = "Grüße aus Köln — ein ziemlich langer Betreff, der gefaltet werden muss, ünd mehr"
    out = downgrade_headers(f"Subject: {subject}\r\n".encode())
    assert out.isascii()
    assert all(len(line) <= 78 for line in lines(out))
    assert b" aus " in out  # ASCII words stay readable
    assert str(parse(out)["Subject"]) == subject


def test_encoded_words_are_short_and_never_split_a_character():
    words = encoded_words("ü" * 100)
    assert all(len(w) <= 75 for w in words)
    assert all(w.startswith("=?utf-8?q?") and w.endswith("?=") for w in words)
    assert all("=C3=BC" * ((len(w) - 12) // 6) == w[10:-2] for w in words)
    assert encoded_words("a_b=c?d e") == ["=?utf-8?q?a=5Fb=3Dc=3Fd_e?="]


def test_address_fields_encode_display_names_and_groups():
    block = (
        "From: Jörg Müller <joerg@example.test>\r\n"
        'To: "Smith, J" <a@b.test>, Ünï: x@y.test, "Zoë" <z@y.test>;, plain@x.test\r\n'
        "Cc: Undisclosed:;\r\n"
        "Reply-To: =?utf-8?q?J=C3=B6rg?= <j@x.test>, Ælfred <ae@x.test>\r\n"
    ).encode()
    out = downgrade_headers(block)
    assert out.isascii()
    assert lines(out)[0] == b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@example.test>"
    assert b"Cc: Undisclosed:;\r\n" in out  # ASCII: untouched
    msg = parse(out)
    assert str(msg["From"]) == "Jörg Müller <joerg@example.test>"
    to = msg["To"]
    assert [g.display_name for g in to.groups] == [None, "Ünï", None]
    assert [a.display_name for a in to.addresses] == ["Smith, J", "", "Zoë", ""]
    assert [a.addr_spec for a in to.addresses] == [
        "a@b.test",
        "x@y.test",
        "z@y.test",
        "plain@x.test",
    ]
    assert [a.display_name for a in msg["Reply-To"].addresses] == ["Jörg", "Ælfred"]


@pytest.mark.parametrize(
    "field, why",
    [
        ("To: jörg@example.test", "the address jörg@example.test is not ASCII"),
        ("From: Alice <alice@exämple.test>", "the address alice@exämple.test is not ASCII"),
        ("Cc: Friends: a@b.test, ü@b.test;", "the address ü@b.test is not ASCII"),
        ("Message-ID: <ü@example.test>", "the Message-ID field holds a non-ASCII identifier"),
        ("References: <a@b> <ü@c>", "the References field holds a non-ASCII identifier"),
        ("To: Jörg <<<", "the To field cannot be parsed"),
        ("Sübject: x", "not a field"),
    ],
)
def test_what_cannot_be_downgraded(field, why):
    with pytest.raises(DowngradeError, match=why):
        downgrade_headers(f"Subject: ok\r\n{field}\r\n".encode())


def test_a_field_that_is_not_utf8_cannot_be_downgraded():
    with pytest.raises(DowngradeError, match="the Subject field is not UTF-8"):
        downgrade_headers(b"Subject: caf\xe9\r\n")


def test_mime_parameters_use_rfc2231():
    name = "Résumé très long nom de fichier avec beaucoup de caractères accentués éàèùç.txt"
    block = (
        f'Content-Type: text/plain; charset=utf-8;\r\n name="{name}"\r\n'
        'Content-Disposition: attachment; filename="Lösung.pdf"\r\n'
    ).encode()
    out = downgrade_headers(block)
    assert out.isascii() and all(len(line) <= 78 for line in lines(out))
    assert b"filename*=utf-8''L%C3%B6sung.pdf" in out
    assert b"name*0*=utf-8''R%C3%A9sum%C3%A9" in out
    msg = parse(out)
    assert msg.get_param("name") == name and msg.get_content_charset() == "utf-8"
    assert msg.get_filename() == "Lösung.pdf"


def queued(tmp_path, data: bytes, trace: bytes = TRACE) -> FileBody:
    path = tmp_path / "q"
    path.write_bytes(data + b"TRAILER")
    return FileBody(trace, str(path), len(data))


def test_downgraded_body_streams_new_headers_then_the_original_body(tmp_path):
    body_part = b"\r\n" + "naïve\r\n".encode() * 5000
    original = queued(tmp_path, "Subject: Grüße\r\nTo: bob@x.test\r\n".encode() + body_part)
    down = downgrade_body(original)
    assert verifyObject(IMessageBody, down)
    expected = TRACE + b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nTo: bob@x.test\r\n" + body_part
    assert down.size == len(expected)
    for size in (7, 100, 4096, 1 << 20):  # chunk boundaries anywhere
        chunks = list(down.chunks(size))
        assert b"".join(chunks) == expected
        assert all(0 < len(c) <= size for c in chunks)
    assert down.header_block() == expected[: expected.index(b"\r\n\r\n") + 2]
    fd = os.open(tmp_path / "copy", os.O_WRONLY | os.O_CREAT)
    try:
        assert down.copy_into(fd, b"X-Prefix: 1\r\n") == len(expected) + 13
    finally:
        os.close(fd)
    assert (tmp_path / "copy").read_bytes() == b"X-Prefix: 1\r\n" + expected


def test_closing_the_stream_closes_the_original(tmp_path):
    closed = []

    class Original:
        size = 20

        def header_block(self, limit=65536):
            return b"Subject: x\r\n"

        def chunks(self, chunk_size=262144):
            try:
                yield b"Subject: x\r\n\r\nbody\r\n"
            finally:
                closed.append(True)

    chunks = DowngradedBody(Original(), b"Subject: y\r\n", 12).chunks()
    assert next(chunks) == b"Subject: y\r\n"
    assert next(chunks) == b"\r\nbody\r\n"
    chunks.close()
    assert closed == [True]


def test_an_ascii_header_section_needs_no_downgrade(tmp_path):
    assert downgrade_body(queued(tmp_path, "Subject: x\r\n\r\nnaïve body\r\n".encode())) is None


def test_a_message_without_a_body(tmp_path):
    down = downgrade_body(queued(tmp_path, "Subject: ü".encode(), trace=b""))
    assert b"".join(down.chunks()) == b"Subject: =?utf-8?q?=C3=BC?=\r\n"
    assert down.size == len(b"Subject: =?utf-8?q?=C3=BC?=\r\n")


def test_a_header_section_too_long_to_check_is_refused(tmp_path):
    data = b"X-Long: " + b"a" * 5000 + b"\r\n" + "Subject: ü\r\n\r\nbody\r\n".encode()
    with pytest.raises(DowngradeError, match="longer than 1024 bytes"):
        downgrade_body(queued(tmp_path, data), limit=1024)
