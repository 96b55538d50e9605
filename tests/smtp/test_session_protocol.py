"""Protocol details of issue #11: VRFY syntax, no client control characters echoed,
slow clients, bare line endings."""

from __future__ import annotations

import pytest

from tests.smtp.helpers import make_harness


def test_vrfy_without_an_argument_is_a_syntax_error():
    h = make_harness()
    h.ehlo()
    h.send("VRFY\r\nVRFY \r\nVRFY alice\r\n")
    assert h.replies() == [
        "501 5.5.4 Syntax: VRFY address",
        "501 5.5.4 Syntax: VRFY address",
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
    ]


@pytest.mark.parametrize(
    "name,shown",
    [
        (b"evil\x1b[31mred", "evil?[31mred"),
        (b"a\x7fb\x08c", "a?b?c"),
        ("caf\u00e9\u2028x".encode(), "caf??x"),
        (b"tab\there", "tab?here"),
    ],
)
def test_ehlo_name_is_echoed_without_control_or_non_ascii_characters(name, shown):
    h = make_harness()
    h.replies()
    h.send(b"EHLO " + name + b"\r\n")
    raw = h.transport.value()
    first = raw.split(b"\r\n")[0]
    assert first == f"250-mx.example.test Hello {shown}".encode()
    assert all(0x20 <= b < 0x7F for b in first)


def test_parameter_names_are_echoed_safely():
    h = make_harness()
    h.ehlo()
    h.send(b"MAIL FROM:<a@remote.test> X\x01\x1bY=1\r\nMAIL FROM:<a@remote.test> \xc3\xa9=1\r\n")
    assert h.replies() == [
        "555 5.5.4 Unsupported parameter X??Y",
        "555 5.5.4 Unsupported parameter ?",
    ]
