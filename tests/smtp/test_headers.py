from mta.smtp.headers import HeaderScanner


def test_header_section_split_anywhere():
    msg = b"Received: a\r\nreceived: b\r\n\tfolded\r\nMessage-ID: <x@y>\r\nDate: now\r\n\r\nReceived: body\r\n"
    for step in (1, 3, 7, len(msg)):
        s = HeaderScanner()
        for i in range(0, len(msg), step):
            s.feed(msg[i : i + step])
        s.finish()
        assert s.done and s.received == 2
        assert s.has("message-id") and s.has("Date") and not s.has("subject")


def test_no_headers_and_limit():
    s = HeaderScanner()
    s.feed(b"\r\nReceived: x\r\n")
    assert s.done and s.received == 0
    s = HeaderScanner(limit=100)
    s.feed(b"X-Long: " + b"a" * 500)
    assert s.done and s.has("x-long")
