"""AttachmentCheck on real MIME messages built with the email package: names in
Content-Disposition and Content-Type (RFC 2231 / RFC 2047 encoded), MIME types,
nested multiparts, attached messages and zip archives."""

from __future__ import annotations

import io
import zipfile
from email.message import EmailMessage
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest
from twisted.internet.defer import succeed
from zope.interface.verify import verifyObject

from mta.interfaces import IPolicyCheck
from mta.policy.attachments import AttachmentCheck, BlockedList, find_blocked
from mta.policy.verdict import Action, Phase, PolicyContext
from mta.testing import MemoryBody

BLOCKED = ["exe", "scr", "js", ".Bat", "tar.gz", "application/x-msdownload"]


def inline(f, *args):
    return succeed(f(*args))


def verdict(data: bytes, action="reject", **kw):
    check = AttachmentCheck(BLOCKED, action=action, run_blocking=inline, **kw)
    context = PolicyContext("192.0.2.1", "smtp", body=MemoryBody(data), size=len(data))
    out = []
    check.check(Phase.DATA, context).addCallback(out.append)
    return out[0]


def base(subject="test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "a@example.test"
    msg["To"] = "b@example.test"
    msg["Subject"] = subject
    msg.set_content("hello\n")
    return msg


def with_attachment(filename, data=b"MZ\x90\x00", maintype="application", subtype="octet-stream"):
    msg = base()
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def zipped(*names, inner=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            z.writestr(name, b"x" * 100)
        if inner is not None:
            z.writestr(inner[0], inner[1])
    return buf.getvalue()


def test_interface():
    assert verifyObject(IPolicyCheck, AttachmentCheck(["exe"]))


def test_clean_message_continues():
    msg = with_attachment("report.pdf", b"%PDF-1.4", "application", "pdf")
    assert verdict(msg.as_bytes()).action is Action.CONTINUE


def test_exe_by_disposition_filename_is_rejected():
    v = verdict(with_attachment("invoice.EXE").as_bytes())
    assert v.action is Action.REJECT
    assert (v.reply.code, v.reply.enhanced) == (554, "5.7.1")
    assert "invoice.EXE" in v.reply.text


def test_name_only_in_content_type():
    msg = base()
    part = MIMEBase("application", "octet-stream", name="setup.scr")
    part.set_payload(b"xx")
    msg.make_mixed()
    msg.attach(part)
    assert "setup.scr" in verdict(msg.as_bytes()).reply.text


def test_rfc2231_encoded_name():
    # EmailMessage encodes a non-ASCII filename with RFC 2231 (filename*=utf-8''...).
    msg = with_attachment("Rechnung-ü.js")
    data = msg.as_bytes()
    assert b"filename*=" in data
    v = verdict(data)
    assert v.action is Action.REJECT and "Rechnung-?.js" in v.reply.text


def test_rfc2047_encoded_name():
    msg = MIMEMultipart()
    msg.attach(MIMEText("hi"))
    part = MIMEApplication(b"xx")
    part.add_header("Content-Disposition", "attachment", filename="=?utf-8?b?cnVuLmJhdA==?=")
    msg.attach(part)
    v = verdict(msg.as_bytes())
    assert v.action is Action.REJECT and "run.bat" in v.reply.text


def test_mime_type_without_name():
    msg = MIMEMultipart()
    msg.attach(MIMEText("hi"))
    msg.attach(MIMEApplication(b"MZ", "x-msdownload"))
    v = verdict(msg.as_bytes())
    assert v.action is Action.REJECT and "application/x-msdownload" in v.reply.text


def test_nested_multipart_and_attached_message():
    inner = with_attachment("payload.exe")
    outer = MIMEMultipart("mixed")
    alternative = MIMEMultipart("alternative")
    alternative.attach(MIMEText("plain"))
    alternative.attach(MIMEText("<p>html</p>", "html"))
    outer.attach(alternative)
    outer.attach(MIMEMessage(inner))
    v = verdict(outer.as_bytes())
    assert v.action is Action.REJECT and "payload.exe" in v.reply.text


def test_name_inside_a_zip():
    msg = with_attachment("docs.zip", zipped("readme.txt", "docs/run.js"), "application", "zip")
    v = verdict(msg.as_bytes())
    assert v.action is Action.REJECT
    assert "docs/run.js (in docs.zip)" in v.reply.text


def test_zip_recognised_by_magic_and_nested_zip():
    data = zipped("a.txt", inner=("inner.zip", zipped("evil.scr")))
    msg = with_attachment("archive.bin", data)
    v = verdict(msg.as_bytes())
    assert v.action is Action.REJECT and "evil.scr" in v.reply.text


def test_clean_zip_and_broken_zip_continue():
    assert verdict(with_attachment("ok.zip", zipped("a.txt", "b.pdf")).as_bytes()).action is (
        Action.CONTINUE
    )
    broken = with_attachment("broken.zip", b"PK\x03\x04garbage")
    assert verdict(broken.as_bytes()).action is Action.CONTINUE


def test_multi_word_extension_and_no_false_match():
    assert verdict(with_attachment("backup.tar.gz").as_bytes()).action is Action.REJECT
    for name in ("notes.exe.txt", "exe", "presentation.js.pdf"):
        assert verdict(with_attachment(name).as_bytes()).action is Action.CONTINUE, name


def test_quarantine_action():
    v = verdict(with_attachment("x.exe").as_bytes(), action="quarantine")
    assert v.action is Action.QUARANTINE
    assert v.reason == "attachments: blocked file x.exe"


def test_reply_is_one_ascii_line():
    import base64

    msg = MIMEMultipart()
    part = MIMEApplication(b"xx")
    encoded = base64.b64encode("a\r\nb\u00fc.exe".encode()).decode()
    part.add_header("Content-Disposition", "attachment", filename=f"=?utf-8?b?{encoded}?=")
    msg.attach(part)
    v = verdict(msg.as_bytes())
    assert v.action is Action.REJECT
    assert v.reply.to_bytes().count(b"\r\n") == 1


def test_only_the_first_bytes_are_parsed():
    msg = base()
    msg.add_attachment(
        b"y" * 50_000, maintype="application", subtype="octet-stream", filename="a.bin"
    )
    msg.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="late.exe")
    data = msg.as_bytes()
    assert verdict(data).action is Action.REJECT
    assert verdict(data, max_bytes=20_000).action is Action.CONTINUE


def test_nothing_configured_or_no_body():
    check = AttachmentCheck([], run_blocking=inline)
    context = PolicyContext("192.0.2.1", "smtp", body=MemoryBody(b"x"))
    assert check.check(Phase.DATA, context).action is Action.CONTINUE
    check = AttachmentCheck(["exe"], run_blocking=inline)
    assert check.check(Phase.DATA, PolicyContext("192.0.2.1", "smtp")).action is Action.CONTINUE


def test_blocked_list_and_bad_action():
    blocked = BlockedList(["EXE", ".js", "Application/X-Msdownload"])
    assert blocked.name_blocked("C:\\temp\\A.Exe") and blocked.name_blocked("x.js.")
    assert not blocked.name_blocked("x.json")
    assert blocked.type_blocked("application/x-msdownload")
    assert find_blocked(blocked, b"not a mime message at all") is None
    with pytest.raises(ValueError):
        AttachmentCheck(["exe"], action="drop")
