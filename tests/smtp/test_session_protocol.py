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


# -- bare line endings: normalised by default, never a terminator ---------------------

SMUGGLES = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]
TX = "MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"


def _no_bare_line_endings(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf and data.count(b"\n") == crlf


@pytest.mark.parametrize("smuggle", SMUGGLES)
@pytest.mark.parametrize("step", [1000, 1])
def test_bare_line_endings_are_normalised_into_one_message(smuggle, step):
    h = make_harness()
    h.ehlo()
    h.send(TX)
    h.replies()
    payload = (
        b"Subject: x\r\n\r\nhi"
        + smuggle
        + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nevil\r\n.\r\n"
    )
    for i in range(0, len(payload), step):
        h.send(payload[i : i + step])
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001"]
    [msg] = h.spool.committed
    assert _no_bare_line_endings(msg.body)
    assert b"MAIL FROM:<evil@remote.test>\r\n" in msg.body, "smuggled commands are content"
    assert msg.body.startswith(b"Subject: x\r\n\r\nhi\r\n") and msg.body.endswith(b"evil\r\n")
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_normalised_lines_are_dot_unstuffed_like_any_other():
    h = make_harness()
    h.ehlo()
    h.send(TX)
    h.send(b"a\n..b\rc\r\n..d\r\n.\r\n")
    assert h.spool.committed[0].body == b"a\r\n.b\r\nc\r\n.d\r\n"


def test_bdat_bare_line_endings_are_normalised_across_chunks():
    h = make_harness()
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    h.send(b"BDAT 5\r\nab\n.\r")
    h.send(b"BDAT 4\r\n\ncd\r")
    h.send(b"BDAT 2 LAST\r\ne\r")
    assert h.codes() == ["250", "250", "250", "250", "250"]
    assert h.spool.committed[0].body == b"ab\r\n.\r\ncd\r\ne\r\n"


def test_bare_newlines_reject_mode_is_the_old_550():
    h = make_harness(config={"limits": {"bare_newlines": "reject"}})
    h.ehlo()
    h.send(TX + "a\nb\r\n.\r\n")
    assert h.replies()[-1].startswith("550 5.6.11")
    assert h.spool.committed == []


# -- slow clients: a deadline per command line, a minimum rate for DATA / BDAT ---------

SLOW = {"limits": {"idle_timeout": 30, "min_data_rate": 500}}
TIMEOUT_421 = "421 4.4.2 Error: timeout exceeded"


def test_a_command_line_must_be_complete_within_the_timeout_of_its_first_byte():
    h = make_harness(config=SLOW)
    h.ehlo()
    h.clock.advance(10)
    h.send("NO")  # the first byte starts the line's clock
    h.clock.advance(20)
    h.send("O")  # trickling more bytes buys no time
    h.clock.advance(9.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    assert h.replies() == [TIMEOUT_421]
    assert h.transport.disconnecting


def test_each_complete_command_starts_a_new_idle_period():
    h = make_harness(config=SLOW)
    h.ehlo()
    for _ in range(5):
        h.clock.advance(29)
        h.send("NOOP\r\n")
    h.send("NO")
    h.clock.advance(29)
    h.send("OP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"] * 6
    assert not h.transport.disconnecting


def test_data_slower_than_min_data_rate_is_closed_with_421():
    h = make_harness(config=SLOW)
    h.ehlo()
    h.send(TX)
    h.replies()
    for _ in range(6):  # 100 bytes every 5 s is 20 bytes/s: each adds only 0.2 s
        h.send(b"x" * 98 + b"\r\n")
        h.clock.advance(5)
    assert not h.transport.disconnecting
    h.send(b"x" * 98 + b"\r\n")
    h.clock.advance(1.5)
    assert h.replies() == [TIMEOUT_421]
    assert h.transport.disconnecting
    assert h.spool.committed == []


def test_data_at_min_data_rate_may_take_longer_than_the_timeout():
    h = make_harness(config=SLOW)
    h.ehlo()
    h.send(TX)
    h.replies()
    for _ in range(120):  # 600 bytes/s for two minutes, four idle timeouts
        h.send(b"y" * 598 + b"\r\n")
        h.clock.advance(1)
    h.send(b".\r\n")
    assert h.replies() == ["250 2.0.0 Ok: queued as Q000001"]
    assert not h.transport.disconnecting


def test_a_stalled_data_transfer_times_out_after_the_idle_timeout():
    h = make_harness(config=SLOW)
    h.ehlo()
    h.send(TX)
    h.send(b"z" * 100_000)  # credit never exceeds the idle timeout
    h.clock.advance(29.9)
    assert not h.transport.disconnecting
    h.clock.advance(0.1)
    assert h.replies()[-1] == TIMEOUT_421


def test_slow_bdat_chunk_is_closed_with_421():
    h = make_harness(config=SLOW)
    h.ehlo()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nBDAT 100000 LAST\r\n")
    h.replies()
    for _ in range(7):
        h.send(b"b" * 100)
        h.clock.advance(5)
    assert h.replies() == [TIMEOUT_421]
    assert h.spool.committed == []


def test_min_data_rate_zero_keeps_only_the_idle_timeout():
    h = make_harness(config={"limits": {"idle_timeout": 30, "min_data_rate": 0}})
    h.ehlo()
    h.send(TX)
    for _ in range(20):
        h.send(b"x\r\n")
        h.clock.advance(29)
    assert not h.transport.disconnecting
