"""A blocked attachment with `attachment_action = "quarantine"` through `twistd mta`:
accepted, kept in <datadir>/quarantine/ instead of the mailbox, then released with
`mta-admin quarantine release` into the mailbox while the server runs."""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage

TIMEOUT = 30.0


def message(filename: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "alice@example.test"
    msg["To"] = "postmaster@localhost"
    msg["Subject"] = f"with {filename}"
    msg.set_content("see attachment\n")
    msg.add_attachment(
        b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename=filename
    )
    return msg.as_bytes()


def wait_for(predicate, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def new_mail(server):
    new = server.maildir("postmaster@localhost") / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_blocked_attachment_is_quarantined_then_released(mta_server_factory):
    server = mta_server_factory(
        {"checks": {"blocked_attachments": ["exe"], "attachment_action": "quarantine"}}
    )
    with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as smtp:
        smtp.sendmail("alice@example.test", ["postmaster@localhost"], message("tool.exe"))
        smtp.sendmail("alice@example.test", ["postmaster@localhost"], message("notes.txt"))
    quarantine = server.datadir / "quarantine"
    (sidecar,) = wait_for(
        lambda: sorted(quarantine.glob("*.json")) if quarantine.is_dir() else [],
        "the quarantined message",
    )
    qid = sidecar.stem
    (delivered,) = wait_for(lambda: new_mail(server), "the clean message")
    assert b"notes.txt" in delivered.read_bytes()

    listing = server.admin("quarantine", "list", check=True).stdout
    assert qid in listing and "attachments: blocked file tool.exe" in listing
    shown = server.admin("quarantine", "show", qid, check=True).stdout
    assert "To: <postmaster@localhost>" in shown and "Subject: with tool.exe" in shown

    released = server.admin("quarantine", "release", qid)
    assert released.returncode == 0, released.stderr
    assert released.stdout.startswith(f"{qid} released: queued as ")
    assert not sidecar.exists()
    mails = wait_for(lambda: new_mail(server) if len(new_mail(server)) == 2 else None, "release")
    data = b"".join(p.read_bytes() for p in mails)
    assert b"X-Quarantine-Released: " + qid.encode() in data
    assert b'filename="tool.exe"' in data
    assert "Quarantine is empty" in server.admin("quarantine", "list", check=True).stdout
