"""`dkimfast.verify_pass` against dkimpy: on thousands of messages signed by dkimpy
with varied options, then tampered with in the ways mail gets changed (and forged),
the direct path says `pass` only where dkimpy's `DKIM.verify` passes too, and it is
the path taken for the usual signatures.  `verify_signatures` reports the same
results either way.  (A unit test of the verifier: the key records come from a dict;
the end-to-end tests resolve them from a real DNS server.)"""

from __future__ import annotations

import random
import time

import dkim
import pytest

from mta.policy import dkimfast, dkimverify
from mta.policy.authdns import DNSTemporaryError
from tests.policy.authzone import ed25519_key, rsa_key


class Records:
    """`AuthDNS.dkim_dnsfunc` from a dict of name -> record."""

    def __init__(self, records):
        self.records = records
        self.asked = []

    def dkim_dnsfunc(self, name, timeout=5):
        self.asked.append(name)
        record = self.records.get(name.decode())
        if isinstance(record, Exception):
            raise record
        return record


KEYS = {
    "rsa": rsa_key("r", "example.test"),
    "small": rsa_key("small", "example.test", bits=1024),
    "ed": ed25519_key("e", "example.test"),
    "other": rsa_key("o", "other.test", bits=3072),  # (keys are shared per size)
}
RECORDS = {f"{k.selector}._domainkey.{k.domain}.": k.record.encode() for k in KEYS.values()}
RECORDS["e._domainkey.mixed.test."] = KEYS["rsa"].record.encode()  # an RSA key for Ed25519
RECORDS["t._domainkey.example.test."] = KEYS["rsa"].record.encode() + b"; s=tlsrpt"
RECORDS["gone._domainkey.example.test."] = b"v=DKIM1; k=rsa; p="


def message(rng: random.Random) -> bytes:
    headers = [
        b"Received: from relay.example.test by mx.test; Fri, 4 Dec 2026 10:00:00 +0000",
        b"From: " + rng.choice([b"Alice <alice@example.test>", b"bob@example.test"]),
        b"To: carol@receiver.test",
        b"Subject: " + rng.choice([b"hello", b"two  spaces\t tab", b"=?utf-8?q?caf=C3=A9?="]),
        b"Date: Fri, 04 Dec 2026 12:00:00 +0000",
        b"Message-ID: <%d@example.test>" % rng.randrange(10**6),
    ]
    if rng.random() < 0.3:
        headers.insert(3, b"X-Folded: first\r\n\tsecond  part ")
    lines = []
    for _ in range(rng.randrange(0, 12)):
        line = b" ".join(rng.choice([b"word", b"a\tb", b"x ", b"", b"  y"]) for _ in range(5))
        lines.append(line)
    body = b"\r\n".join(lines) + rng.choice([b"\r\n", b"\r\n\r\n\r\n", b""])
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


def sign(rng: random.Random, data: bytes, key) -> bytes:
    c = (rng.choice([b"relaxed", b"simple"]), rng.choice([b"relaxed", b"simple"]))
    names = rng.choice(
        [
            [b"from", b"to", b"subject", b"date", b"message-id"],
            [b"from", b"subject"],
            [b"from", b"from", b"to", b"x-folded", b"subject"],  # over-signed From
            [b"to", b"subject"],  # From not signed
        ]
    )
    kw = {"canonicalize": c, "include_headers": names}
    if rng.random() < 0.2:
        kw["length"] = True  # l=: dkimpy only
    if rng.random() < 0.2:
        kw["identity"] = rng.choice([b"@example.test", b"a@sub.example.test", b"x@evil.test"])
    algorithm = key.algorithm
    if algorithm == b"rsa-sha256" and rng.random() < 0.1:
        algorithm = b"rsa-sha1"  # dkimpy only
    try:
        signature = dkim.sign(
            data,
            key.selector.encode(),
            key.domain.encode(),
            key.private,
            signature_algorithm=algorithm,
            **kw,
        )
    except dkim.DKIMException:
        return data
    return signature + data


def tamper(rng: random.Random, data: bytes) -> bytes:
    """The changes mail meets on its way, and forgers' changes."""
    head, _, body = data.partition(b"\r\n\r\n")
    choice = rng.randrange(14)
    if choice == 0:
        return data  # untouched
    if choice == 1:
        return head + b"\r\n\r\n" + body + b"appended\r\n"
    if choice == 2:
        return head + b"\r\n\r\n" + body.replace(b"word", b"Word", 1)
    if choice == 3:
        return head.replace(b"Subject: ", b"Subject:  ", 1) + b"\r\n\r\n" + body
    if choice == 4:
        return head.replace(b"Subject:", b"SUBJECT:", 1) + b"\r\n\r\n" + body
    if choice == 5:
        return b"From: mallory@evil.test\r\n" + data  # a second From above
    if choice == 6:
        return head + b"\r\nFrom: mallory@evil.test\r\n\r\n" + body  # and below
    if choice == 7:
        return head.replace(b"hello", b"hellO", 1) + b"\r\n\r\n" + body
    if choice == 8:
        return head + b"\r\n\r\n" + body + b"\r\n\r\n"  # empty lines at the end
    if choice == 9:
        return head.replace(b" d=example.test", b" d=other.test", 1) + b"\r\n\r\n" + body
    if choice == 10:
        return head.replace(b" s=r;", b" s=gone;", 1).replace(b" s=r\r", b" s=gone\r", 1) + (
            b"\r\n\r\n" + body
        )
    if choice == 11:
        return head.replace(b" a=ed25519-sha256", b" a=rsa-sha256", 1) + b"\r\n\r\n" + body
    if choice == 12:
        return head.replace(b"v=1;", b"v=1; x=1000;", 1) + b"\r\n\r\n" + body  # expired
    return head.replace(b"b=", b"b=A", 1) + b"\r\n\r\n" + body  # a damaged signature


MINKEY = 2048  # so that the 1024-bit key is one too small


def dkimpy_result(data: bytes, idx: int, dns) -> bool:
    try:
        return dkim.DKIM(data, minkey=MINKEY).verify(idx=idx, dnsfunc=dns.dkim_dnsfunc)
    except Exception:  # dkimpy's errors are all "not pass" here
        return False


def test_pass_only_where_dkimpy_passes_and_the_usual_signatures_take_it():
    rng = random.Random(20261204)
    dns = Records(RECORDS)
    fast_passes = left_to_dkimpy = 0
    for _ in range(2500):
        key = KEYS[rng.choice(["rsa", "rsa", "ed", "small", "other"])]
        data = tamper(rng, sign(rng, message(rng), key))
        if rng.random() < 0.15:  # a second signature on top
            data = sign(rng, data, KEYS[rng.choice(["rsa", "ed"])])
        headers, body = dkim.rfc822_parse(data)
        signatures = [h for h in headers if h[0].lower() == b"dkim-signature"]
        for idx, header in enumerate(signatures):
            fast = dkimfast.verify_pass(headers, body, header, dns, minkey=MINKEY)
            slow = dkimpy_result(data, idx, dns)
            if fast is not None:
                fast_passes += 1
                assert slow, data  # never a pass dkimpy would not give
            elif slow:  # a pass left to dkimpy: only what the direct path leaves it
                left_to_dkimpy += 1
                tags = dkimfast._tags(header[1])
                assert b"l" in tags or tags[b"a"] == b"rsa-sha1", header
    assert fast_passes > 2 * left_to_dkimpy > 0


def test_verify_signatures_reports_what_dkimpy_reports():
    rng = random.Random(7)
    dns = Records(RECORDS)
    for _ in range(300):
        data = tamper(rng, sign(rng, message(rng), KEYS[rng.choice(["rsa", "ed", "small"])]))
        got = dkimverify.verify_signatures(data, dns, minkey=MINKEY)
        checker = dkim.DKIM(data, logger=dkimverify._quiet, minkey=MINKEY)
        expected = tuple(dkimverify._verify_one(checker, i, dns) for i in range(len(got)))
        assert got == expected


@pytest.mark.parametrize(
    "record, why",
    [
        (None, "no key published"),
        (DNSTemporaryError("timeout"), "the key could not be fetched"),
        (b"v=DKIM1; k=rsa; p=", "a revoked key"),
        (KEYS["small"].record.encode(), "a key under minkey"),
        (KEYS["ed"].record.encode(), "a key of another type"),
        (KEYS["rsa"].record.encode() + b"; s=tlsrpt", "a key for TLS reports only"),
        (KEYS["other"].record.encode(), "another key"),
    ],
)
def test_anything_but_a_clean_pass_is_left_to_dkimpy(record, why):
    data = KEYS["rsa"].sign(message(random.Random(1)))
    headers, body = dkim.rfc822_parse(data)
    dns = Records({"r._domainkey.example.test.": record})
    assert dkimfast.verify_pass(headers, body, headers[0], dns, minkey=MINKEY) is None, why
    dns = Records({"r._domainkey.example.test.": KEYS["rsa"].record.encode()})
    assert dkimfast.verify_pass(headers, body, headers[0], dns, minkey=MINKEY) is not None


def test_a_signature_from_the_future_is_left_to_dkimpy(monkeypatch):
    data = KEYS["rsa"].sign(message(random.Random(2)))
    headers, body = dkim.rfc822_parse(data)
    dns = Records(RECORDS)
    assert dkimfast.verify_pass(headers, body, headers[0], dns) is not None
    now = time.time()
    monkeypatch.setattr(dkim.time, "time", lambda: now - 36000 - 60)
    assert dkimfast.verify_pass(headers, body, headers[0], dns) is None
