"""RFC 6409 section 8 fix-ups: finding Message-ID and Date in a streamed header."""

from __future__ import annotations

import email.utils

import pytest

from mta.smtp.fixups import HeaderScanner, missing_headers, rfc5322_date

NOW = 1_700_000_000.0


def scan(*chunks: bytes, finish: bool = True) -> HeaderScanner:
    scanner = HeaderScanner()
    for chunk in chunks:
        scanner.feed(chunk)
    if finish:
        scanner.finish()
    return scanner


def fixups(scanner: HeaderScanner) -> bytes:
    return missing_headers(scanner, queue_id="4Ab3xQ", hostname="mx.example.test", now=NOW)


def test_both_missing():
    s = scan(b"From: a@example.test\r\nSubject: hi\r\n\r\nbody\r\n")
    assert s.done and not s.has_message_id and not s.has_date
    out = fixups(s)
    assert out == (
        b"Message-ID: <4Ab3xQ@mx.example.test>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    )


def test_both_present_any_case():
    s = scan(b"message-ID: <x@y>\r\nDATE: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\n")
    assert s.has_message_id and s.has_date
    assert fixups(s) == b""


def test_fields_after_the_header_section_do_not_count():
    s = scan(b"Subject: x\r\n\r\nMessage-ID: <a@b>\r\nDate: today\r\n")
    assert not s.has_message_id and not s.has_date


def test_a_non_header_line_ends_the_header_section():
    s = scan(b"Subject: x\r\nthis is body text\r\nDate: no\r\n")
    assert s.done and not s.has_date


def test_folded_lines_and_whitespace_before_colon():
    s = scan(b"Subject: a\r\n long folded\r\n\tmore\r\nDate : Tue, 14 Nov 2023\r\n\r\n")
    assert s.has_date


@pytest.mark.parametrize("split", range(1, 60))
def test_chunk_boundaries_anywhere(split):
    message = b"Subject: x\r\nMessage-Id: <a@b>\r\nDate: Tue\r\n\r\nMessage-Id: no\r\n"
    s = scan(message[:split], message[split:])
    assert s.has_message_id and s.has_date


def test_byte_at_a_time():
    message = b"X-Long: " + b"y" * 5000 + b"\r\nDate: now\r\n\r\nbody"
    s = scan(*(message[i : i + 1] for i in range(len(message))))
    assert s.has_date and not s.has_message_id


def test_state_stays_small_with_huge_lines():
    s = HeaderScanner()
    s.feed(b"X-Huge: " + b"z" * 10_000_000)
    assert len(s._line) <= 80
    s.feed(b"\r\nMessage-ID: <m@x>\r\n\r\n")
    assert s.done and s.has_message_id


def test_header_only_message_without_final_newline():
    s = scan(b"Subject: x\r\nDate: Tue", finish=False)
    assert not s.has_date  # line not finished yet
    s.finish()
    assert s.has_date and s.done


def test_empty_message_and_bare_lf():
    assert fixups(scan()).startswith(b"Message-ID: <4Ab3xQ@mx.example.test>\r\nDate: ")
    s = scan(b"Date: x\nMessage-ID: <a@b>\n\nbody")
    assert s.has_date and s.has_message_id


def test_date_parses_back():
    parsed = email.utils.parsedate_to_datetime(rfc5322_date(NOW))
    assert parsed.timestamp() == NOW
    assert rfc5322_date(NOW).endswith("+0000")


def test_feeding_after_done_is_ignored():
    s = scan(b"Subject: x\r\n\r\n", finish=False)
    assert s.done
    s.feed(b"Date: late\r\n")
    assert not s.has_date


def test_received_fields_are_counted_for_loop_detection():
    s = scan(b"Received: a\r\nreceived: b\r\n\tfolded\r\nSubject: x\r\n\r\nReceived: body\r\n")
    assert s.received == 2


def test_received_date_is_utc_plus_0000():
    from mta.smtp.received import _date

    assert _date(0.0).endswith(" +0000")  # -0000 means "local time unknown" (RFC 5322 3.3)
