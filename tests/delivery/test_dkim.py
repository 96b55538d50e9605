"""DKIM signing: domain choice, dkimpy verification, key files, rotation on a Clock."""

from __future__ import annotations

import os
import stat

import dkim
import pytest

from mta.admin import dkim as keys
from mta.app import ConfigWatcher
from mta.config import load_config
from mta.delivery.dkim import DKIMSigner, from_domain, headers_to_sign
from tests.queue.doubles import InlinePool, ThreadClock

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: signed\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"Received: from client by mx.example.test\r\n"
    b"\r\n"
    b"Hello,\r\n\r\nbody text\r\n"
)

_KEYS: dict[int, tuple[bytes, str]] = {}


def keypair(n=0):
    # 1024-bit keys keep the test fast; dkimpy's minimum.
    if n not in _KEYS:
        _KEYS[n] = keys.generate_key(1024)
    return _KEYS[n]


def write_config(tmp_path, selector="s1", domains=("example.test",)):
    path = tmp_path / "mta.toml"
    dlist = ", ".join(f'"{d}"' for d in domains)
    path.write_text(
        f'datadir = "{tmp_path / "var"}"\n[dkim]\nselector = "{selector}"\ndomains = [{dlist}]\n'
    )
    # Each rewrite must look like a change even within the file system's mtime granularity.
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + write_config.bump))
    write_config.bump += 1_000_000_000
    return load_config(str(path))


write_config.bump = 0


def install_key(config, domain, selector, n=0):
    pem, public = keypair(n)
    keys.write_key(config.path("dkim"), domain, selector, pem)
    return public


def dns_for(records):
    def dnsfunc(name, timeout=5):
        return records.get(name.decode() if isinstance(name, bytes) else name, b"")

    return dnsfunc


def sign(signer, sender_domain, message=MESSAGE):
    out = []
    signer.sign(sender_domain, message).addBoth(out.append)
    assert len(out) == 1
    return out[0]


@pytest.fixture
def clock():
    return ThreadClock()


def make_signer(config, pool, clock):
    return DKIMSigner(config.dkim, config.path("dkim"), pool, clock)


def test_signs_from_domain_and_verifies_with_dkimpy(tmp_path, clock):
    config = write_config(tmp_path)
    public = install_key(config, "example.test", "s1")
    signer = make_signer(config, InlinePool(), clock)
    header = sign(signer, "bounce.other.test")
    assert header.startswith(b"DKIM-Signature: ") and header.endswith(b"\r\n")
    tags = dict(
        t.strip().split("=", 1)
        for t in header.decode().split(":", 1)[1].replace("\r\n", "").split(";")
        if t.strip()
    )
    assert tags["d"] == "example.test" and tags["s"] == "s1"
    assert tags["a"] == "rsa-sha256" and tags["c"] == "relaxed/relaxed"
    signed = tags["h"].replace(" ", "").lower().split(":")
    assert signed.count("from") == 2 and "received" not in signed
    assert {"to", "subject", "date", "message-id"} <= set(signed)
    records = {"s1._domainkey.example.test.": keys.txt_value(public).encode()}
    assert dkim.verify(header + MESSAGE, dnsfunc=dns_for(records))
    tampered = header + MESSAGE.replace(b"body text", b"changed")
    assert not dkim.verify(tampered, dnsfunc=dns_for(records))


def test_unlisted_domains_are_not_signed(tmp_path, clock):
    config = write_config(tmp_path, domains=("other.test",))
    install_key(config, "example.test", "s1")
    signer = make_signer(config, InlinePool(), clock)
    assert sign(signer, "example.test") == b""


def test_envelope_sender_domain_when_from_is_not_listed(tmp_path, clock):
    config = write_config(tmp_path, domains=("lists.example.test",))
    install_key(config, "lists.example.test", "s1")
    signer = make_signer(config, InlinePool(), clock)
    assert b"d=lists.example.test;" in sign(signer, "Lists.Example.Test")


def test_missing_key_sends_unsigned(tmp_path, clock):
    config = write_config(tmp_path)
    pool = InlinePool()
    signer = make_signer(config, pool, clock)
    assert sign(signer, "example.test") == b""
    install_key(config, "example.test", "s1")
    assert sign(signer, "example.test").startswith(b"DKIM-Signature")


def test_no_domains_means_no_thread_hop(tmp_path, clock):
    config = load_config(None, datadir=str(tmp_path))
    pool = InlinePool()
    signer = make_signer(config, pool, clock)
    assert sign(signer, "example.test") == b""
    assert pool.jobs == 0


def test_rotation_switches_selector_when_the_config_file_changes(tmp_path, clock):
    config = write_config(tmp_path, selector="s1")
    install_key(config, "example.test", "s1", 0)
    public2 = install_key(config, "example.test", "s2", 1)
    signer = make_signer(config, InlinePool(), clock)
    watcher = ConfigWatcher(config, clock, InlinePool(), signer)
    watcher.startService()
    assert b"s=s1;" in sign(signer, "example.test")
    write_config(tmp_path, selector="s2")
    os.utime(tmp_path / "mta.toml", ns=(1, 1))  # a different mtime, whatever the clock
    clock.advance(0.5)
    assert b"s=s1;" in sign(signer, "example.test")  # not re-checked within a second
    clock.advance(0.5)
    header = sign(signer, "example.test")
    assert b"s=s2;" in header
    records = {"s2._domainkey.example.test.": keys.txt_value(public2).encode()}
    assert dkim.verify(header + MESSAGE, dnsfunc=dns_for(records))
    watcher.stopService()


def test_sighup_reload_rereads_at_once_and_bad_config_keeps_settings(tmp_path, clock):
    config = write_config(tmp_path, selector="s1")
    install_key(config, "example.test", "s1", 0)
    install_key(config, "example.test", "s2", 1)
    signer = make_signer(config, InlinePool(), clock)
    watcher = ConfigWatcher(config, clock, InlinePool(), signer, interval=3600)
    watcher.startService()
    assert b"s=s1;" in sign(signer, "example.test")
    write_config(tmp_path, selector="s2")
    watcher.check(force=True)  # what SIGHUP does
    assert b"s=s2;" in sign(signer, "example.test")
    (tmp_path / "mta.toml").write_text('[dkim]\nselector = "bad selector"\n')
    watcher.check(force=True)
    assert b"s=s2;" in sign(signer, "example.test")
    watcher.stopService()


def test_from_domain_and_header_list():
    assert from_domain(MESSAGE) == "example.test"
    assert (
        from_domain(b"From: =?utf-8?q?A?=\r\n <a@Sub.Example.Test>\r\n\r\nx") == "sub.example.test"
    )
    assert from_domain(b"Subject: none\r\n\r\nFrom: x@y.test\r\n") is None
    assert headers_to_sign(b"from: a@b\r\nX-Other: 1\r\nSubject: s\r\n\r\n") == [
        b"from",
        b"subject",
        b"from",
    ]


def test_keygen_file_mode_record_and_no_overwrite(tmp_path):
    pem, public = keys.generate_key(2048)
    path = keys.write_key(str(tmp_path / "dkim"), "example.test", "s1", pem)
    assert path == str(tmp_path / "dkim" / "example.test.s1.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert open(path, "rb").read().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    record = keys.txt_record("example.test", "s1", public)
    assert record.startswith('s1._domainkey.example.test. IN TXT "v=DKIM1; k=rsa; p=MII')
    strings = record.split(" IN TXT ", 1)[1]
    parts = [p.strip('"') for p in strings.split('" "')]
    assert len(parts) == 2 and all(len(p) <= 255 for p in parts)
    assert "".join(parts) == keys.txt_value(public)
    with pytest.raises(keys.KeyExists):
        keys.write_key(str(tmp_path / "dkim"), "example.test", "s1", pem)
    with pytest.raises(ValueError):
        keys.generate_key(512)


def test_sign_job_reads_the_queued_message(tmp_path, clock):
    from mta.queue.filestore import FileQueueStore
    from tests.queue.doubles import envelope

    config = write_config(tmp_path)
    public = install_key(config, "example.test", "s1")
    pool = InlinePool()
    store = FileQueueStore(str(tmp_path / "queue"), clock, pool)
    committed = []
    store.spool.on_commit = committed.append
    trace, body = MESSAGE.split(b"Received: from client by mx.example.test\r\n")
    f = store.open(store.new_queue_id())
    f.write(body)
    f.commit(envelope("bob@remote.test"), trace)
    (entry,) = committed
    entry.body.forget_memory()  # read from the queue file, as a retry would
    signer = make_signer(config, pool, clock)
    out = []
    job = entry.job()
    signer.sign_job(job).addBoth(out.append)
    (header,) = out
    sent = header + b"".join(job.body.chunks())
    records = {"s1._domainkey.example.test.": keys.txt_value(public).encode()}
    assert dkim.verify(sent, dnsfunc=dns_for(records))
