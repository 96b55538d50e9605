"""`mta.policy.dkimcanon`'s shortcuts give exactly what dkimpy's functions give."""

from __future__ import annotations

import random

import dkim
import dkim.canonicalization as canon
import pytest

from mta.policy import dkimcanon

dkimcanon.install()
ORIGINAL = dkimcanon._original

SAMPLES = [
    b"",
    b"plain words with single spaces\r\n",
    b"two  spaces\r\n",
    b"a\ttab\r\n",
    b"trailing space \r\nnext\r\n",
    b"trailing tab\t\r\n",
    b"folded\r\n value\r\n",
    b"bare\nLF \n",
    b"\r\n\r\n",
    b" \t \r\n",
    b"ends without CRLF  ",
    b"space before CR \r",
]


def randomised(n: int = 300) -> list[bytes]:
    rng = random.Random(6376)
    alphabet = [b"a", b"b", b" ", b"\t", b"\r\n", b"\n", b"\r", b"\x00", b"\xff"]
    return [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(30))) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(dkimcanon._SHORTCUTS))
def test_each_shortcut_agrees_with_dkimpy(name):
    ours, theirs = getattr(canon, name), ORIGINAL[name]
    assert ours is dkimcanon._SHORTCUTS[name]
    for content in SAMPLES + randomised():
        assert ours(content) == theirs(content), content


def test_relaxed_canonicalization_of_a_message_is_unchanged():
    body = b"Hello  Bob,\r\n\r\nline with trailing \t \r\n\tindented\r\n\r\n\r\n"
    headers = [(b"Subject ", b" a\r\n  folded\tsubject \r\n"), (b"From", b" a@b.test\r\n")]
    relaxed = canon.Relaxed
    got = (relaxed.canonicalize_body(body), relaxed.canonicalize_headers(headers))
    for name in dkimcanon._SHORTCUTS:
        setattr(canon, name, ORIGINAL[name])
    try:
        expected = (relaxed.canonicalize_body(body), relaxed.canonicalize_headers(headers))
    finally:
        for name, f in dkimcanon._SHORTCUTS.items():
            setattr(canon, name, f)
    assert got == expected
    assert got[0] == b"Hello Bob,\r\n\r\nline with trailing\r\n indented\r\n"


def test_install_is_idempotent():
    dkimcanon.install()
    assert ORIGINAL["compress_whitespace"] is not dkimcanon._compress


MESSAGES = [
    b"From: a@b.test\r\nSubject: x\r\n\r\nbody\r\n",
    b"From: a@b.test\r\nSubject: folded\r\n more\r\n\r\nbody\r\n\r\n\r\n",
    b"From: a@b.test\r\n\r\n",
    b"From: a@b.test\r\n",  # no body
    b"\r\n\r\nbody only\r\n",
    b"\r\nFrom: a@b.test\r\n\r\nempty line first\r\n",
    b"From: a@b.test\nSubject: bare LF\n\nbody\n",
    b"From: a@b.test\r\nSubject: x\r\n\r\nbody with a bare\nLF\r\n",
    b"From: a@b.test\r\nX: lone \r CR\r\n\r\nb\rody\r\n",
    b"From a@b.test  Mon\r\nFrom: a@b.test\r\n\r\nmbox line\r\n",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_parse_agrees_with_dkimpy(message):
    try:
        expected = ORIGINAL["rfc822_parse"](message)
    except Exception as e:
        with pytest.raises(type(e)):
            dkim.rfc822_parse(message)
        return
    assert dkim.rfc822_parse(message) == expected


def test_parse_agrees_on_random_messages():
    rng = random.Random(5322)
    parts = [
        b"From: a@b.test",
        b"X-Y: v",
        b" folded",
        b"\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"body",
        b" ",
    ]
    for _ in range(500):
        message = b"".join(rng.choice(parts) for _ in range(rng.randrange(12)))
        try:
            expected = ORIGINAL["rfc822_parse"](message)
        except Exception as e:
            with pytest.raises(type(e)):
                dkim.rfc822_parse(message)
            continue
        assert dkim.rfc822_parse(message) == expected, message


SIGNATURE = (
    b" v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.test;\r\n i=@sender.test; s=bench;"
    b" h=from : to;\r\n bh=DWYGM2c6vGVW8fUuCSuAjM8mifdeeHUMDvZDfwXCxfs=;\r\n"
    b" b=k0uBM/qaK3fOy3RL+p3LHLL4rrHv8dCCDXfnlAVJerMlBl+1PZthn6wxUtO5QEL4LDKRw\r\n"
    b" wIzqjqOl40/8UQj6RrRvX4TCaTAZPrEh3zuJBELXX1Yc17fO3zsZMHiGzRM+/s1Q22ZTsWn==\r\n"
)


def test_b_tag_blanking_agrees_with_dkimpy():
    ours, theirs = dkim.RE_BTAG, ORIGINAL["RE_BTAG"]
    assert ours is dkimcanon.RE_BTAG and theirs is not ours
    samples = [SIGNATURE, SIGNATURE.replace(b" b=", b" b =\r\n\t"), SIGNATURE + b"; x=y"]
    rng = random.Random(8601)
    alphabet = [b"b", b"=", b";", b" ", b"\t", b"\r\n", b"\n", b"\r", b"a", b"Z", b"+", b"/"]
    alphabet += [b"9", b"h", b"b=", b"; b =", b"\x0b", b"\x0c", b"-", b"\xff"]
    samples += [
        b"".join(rng.choice(alphabet) for _ in range(rng.randrange(25))) for _ in range(20000)
    ]
    for value in samples:
        assert ours.sub(b"\\1", value) == theirs.sub(b"\\1", value), value
    assert ours.sub(b"\\1", SIGNATURE).endswith(b"Cxfs=;\r\n b=")
