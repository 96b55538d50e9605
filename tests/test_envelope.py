"""RFC 5321 path parsing: what we accept, how it renders, what we refuse."""

import pytest

from mta.envelope import Address, AddressError, Reply, parse_mailbox, parse_path


@pytest.mark.parametrize(
    "text,local,domain,rendered",
    [
        ("<a@b.example>", "a", "b.example", "<a@b.example>"),
        ("<A.B+tag@EXAMPLE.Test>", "A.B+tag", "example.test", "<A.B+tag@example.test>"),
        ('<"john doe"@x.test>', "john doe", "x.test", '<"john doe"@x.test>'),
        ('<"a\\"b"@x.test>', 'a"b', "x.test", '<"a\\"b"@x.test>'),
        ('<"a@b"@x.test>', "a@b", "x.test", '<"a@b"@x.test>'),
        ("<@r1.test,@r2.test:u@x.test>", "u", "x.test", "<u@x.test>"),
        ("<u@[192.0.2.1]>", "u", "[192.0.2.1]", "<u@[192.0.2.1]>"),
        ("<u@[IPv6:2001:db8::1]>", "u", "[ipv6:2001:db8::1]", "<u@[ipv6:2001:db8::1]>"),
        ("<PostMaster>", "postmaster", "", "<postmaster>"),
    ],
)
def test_valid_paths(text, local, domain, rendered):
    addr = parse_path(text)
    assert (addr.local, addr.domain) == (local, domain)
    assert addr.path == rendered


@pytest.mark.parametrize(
    "text",
    [
        "a@b.test",
        "<a@b.test",
        "<a>",
        "<a@@b.test>",
        "<a@b@c.test>",
        "<.a@b.test>",
        "<a..b@b.test>",
        "<a@-b.test>",
        "<a@b_c.test>",
        "<a@[300.1.1.1]>",
        "<a@[1.2.3.4>",
        '<"unterminated@b.test>',
        "<a b@c.test>",
        "<@r.test:>",
        "<" + "x" * 65 + "@b.test>",
        "<a@" + "b" * 300 + ".test>",
        "<jörg@b.test>",
    ],
)
def test_invalid_paths(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_null_path_only_where_allowed():
    assert parse_path("<>", allow_null=True).is_null
    with pytest.raises(AddressError):
        parse_path("<>")


def test_utf8_needs_flag():
    addr = parse_path("<jörg@bücher.test>", utf8=True)
    assert addr.is_utf8 and str(addr) == "jörg@bücher.test"


def test_parse_mailbox_and_str_roundtrip():
    for text in ["a@b.test", '"x y"@b.test', "a.b@c.test"]:
        assert str(parse_mailbox(text)) == text
    assert str(Address("", "")) == ""


def test_reply_rendering():
    assert Reply(250, "2.0.0", "Ok").to_bytes() == b"250 2.0.0 Ok\r\n"
    assert Reply(250, "", "a\nb\nc").to_bytes() == b"250-a\r\n250-b\r\n250 c\r\n"
    assert Reply(451, "4.3.0", "x").is_transient
