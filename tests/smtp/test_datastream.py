"""The DATA / BDAT decoders: any split of the stream gives the same message."""

from __future__ import annotations

import random

import pytest

from mta.smtp.datastream import ChunkChecker, DotDecoder

TOKENS = [b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\n.", b"\r."]


def _decode(stream: bytes, cuts: list[int], normalize: bool):
    decoder = DotDecoder(normalize)
    body, rest = [], None
    pieces = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for piece in pieces:
        if rest is not None:
            rest += piece
            continue
        out, rest = decoder.feed(piece)
        body.append(out)
    return b"".join(body), rest, decoder


@pytest.mark.parametrize("normalize", [True, False])
def test_every_split_decodes_the_same(normalize):
    rng = random.Random(5321)
    for _ in range(400):
        content = b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(0, 30)))
        stream = content + b"\r\n.\r\nNOOP\r\n"
        whole = _decode(stream, [], normalize)
        for _ in range(5):
            cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, 6)))
            split = _decode(stream, cuts, normalize)
            assert split[:2] == whole[:2], (stream, cuts)
            assert split[2].bare_line_endings == whole[2].bare_line_endings
            assert split[2].normalized == whole[2].normalized
        body, rest, decoder = whole
        assert rest is not None and rest.endswith(b"NOOP\r\n")
        if normalize:
            crlf = body.count(b"\r\n")
            assert body.count(b"\r") == crlf and body.count(b"\n") == crlf
            assert not decoder.bare_line_endings


def test_only_crlf_dot_crlf_ends_data():
    for smuggle in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n"):
        body, rest = DotDecoder(True).feed(b"x" + smuggle + b"y\r\n.\r\n")
        assert rest == b"" and body.endswith(b"y\r\n") and b"x\r\n" in body


def test_chunk_checker_normalises_and_holds_a_trailing_cr():
    checker = ChunkChecker(normalize=True)
    assert checker.feed(b"a\r") == b"a"
    assert checker.feed(b"\nb\n") == b"\r\nb\r\n"
    assert checker.feed(b"c\r") == b"c"
    assert checker.finish() == b"\r\n"
    assert checker.normalized and not checker.bare_line_endings
    strict = ChunkChecker()
    assert strict.feed(b"a\r") == b"a\r" and strict.finish() == b""
    assert strict.bare_line_endings
