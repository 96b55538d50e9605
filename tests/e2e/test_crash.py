"""kill -9 under load: nothing that got a 250 is lost, nothing is delivered twice."""

from __future__ import annotations

import smtplib
import threading
import time

import pytest

from tests.e2e.test_receive import DELIVERY_TIMEOUT

pytestmark = pytest.mark.e2e


def _sender(host: str, port: int, worker: int, acked: list, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP(host, port, timeout=10) as client:
                client.ehlo(f"w{worker}.test")
                while not stop.is_set():
                    n += 1
                    tag = f"w{worker}-m{n}"
                    body = (
                        f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n{tag}\r\n".encode()
                        + b"z" * 3000
                        + b"\r\n"
                    )
                    client.sendmail("load@remote.test", ["postmaster@localhost"], body)
                    acked.append(tag)  # only after the 250
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)


def _tags(maildir) -> list[str]:
    tags = []
    for sub in ("new", "cur"):
        d = maildir / sub
        if d.is_dir():
            for p in d.iterdir():
                for line in p.read_bytes().split(b"\r\n"):
                    if line.startswith(b"X-Tag: "):
                        tags.append(line[7:].decode())
                        break
    return tags


@pytest.mark.slow
@pytest.mark.parametrize("round_,workers", [(1, 1), (2, 1), (1, 2)])
def test_kill9_loses_nothing_acknowledged_and_duplicates_nothing(
    mta_server_factory, round_, workers
):
    mta_server = mta_server_factory({"workers": workers})
    acked: list[str] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_sender,
            args=(mta_server.host, mta_server.smtp_port, w, acked, stop),
            daemon=True,
        )
        for w in range(4)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 150 * round_ and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mta_server.kill9() == -9
    stop.set()
    for t in threads:
        t.join(15)
    before_restart = len(acked)
    assert before_restart >= 150 * round_

    mta_server.start()
    maildir = mta_server.maildir("postmaster@localhost")
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while time.monotonic() < deadline:
        delivered = _tags(maildir)
        if set(acked) <= set(delivered):
            break
        time.sleep(0.1)
    delivered = _tags(maildir)
    missing = set(acked) - set(delivered)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    duplicates = {t for t in delivered if delivered.count(t) > 1}
    assert not duplicates, f"delivered twice: {sorted(duplicates)[:5]}"
    # Nothing left behind in the queue once everything is delivered.
    listing = mta_server.admin("queue", "list")
    assert listing.returncode == 0, listing.stderr
