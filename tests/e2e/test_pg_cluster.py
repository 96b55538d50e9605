"""Two `twistd mta` nodes sharing the PostgreSQL queue: one is killed with SIGKILL
under load, the other finishes its work; every acknowledged message arrives once.

Both nodes deliver into the same mail store (a shared data directory, as a cluster
shares its storage), which is the receiving sink: every X-Tag is counted there.
The killed node's leased messages wait for their leases (`[queue] lease` = 5 s)
to expire; the survivor then takes them, as recovered entries, so the store's
copy check keeps a message the dead node had stored but not recorded from being
stored twice.
"""

from __future__ import annotations

import smtplib
import threading
import time

import pytest

from tests.e2e.test_crash import _tags
from tests.queue.pgtesting import private_database

pytestmark = pytest.mark.e2e

DELIVERY_TIMEOUT = 120.0


def _sender(servers, worker: int, acked: list, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        server = servers[(worker + n) % len(servers)]
        if not server.running:
            servers = [s for s in servers if s.running]
            continue
        try:
            with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
                client.ehlo(f"w{worker}.test")
                for _ in range(5):
                    if stop.is_set():
                        return
                    n += 1
                    tag = f"w{worker}-m{n}"
                    body = (
                        f"Subject: {tag}\r\nMessage-ID: <{tag}@load.test>\r\nX-Tag: {tag}\r\n"
                        f"\r\n{tag}\r\n".encode()
                        + b"z" * 2000
                        + b"\r\n"
                    )
                    client.sendmail("load@remote.test", ["postmaster@localhost"], body)
                    acked.append(tag)  # only after the 250
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)


@pytest.mark.slow
def test_a_node_killed_under_load_loses_nothing_and_duplicates_nothing(
    mta_server_factory, tmp_path
):
    with private_database("test_pgq_e2e") as dsn:
        shared = tmp_path / "shared"
        config = {
            "datadir": str(shared),
            # One delivery at a time: arrivals outrun it, so the killed node holds many
            # leased messages when it dies.
            "queue": {
                "backend": "postgresql",
                "lease": 5.0,
                "retry_schedule": [1.0],
                "delivery_concurrency": 1,
            },
            "database": {"dsn": dsn},
        }
        a = mta_server_factory(config, name="a")
        b = mta_server_factory(config, name="b")
        acked: list[str] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=_sender, args=([a, b], w, acked, stop), daemon=True)
            for w in range(4)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while len(acked) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.kill9() == -9
        killed_at = len(acked)
        while len(acked) < killed_at + 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(15)
        assert killed_at >= 200, f"only {killed_at} messages accepted before the kill"

        status = b.admin("cluster", "status")
        assert status.returncode == 0, status.stderr
        assert "mx.example.test" in status.stdout

        maildir = shared / "mail" / "localhost" / "postmaster"
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while time.monotonic() < deadline:
            if set(acked) <= set(_tags(maildir)):
                break
            time.sleep(0.2)
        delivered = _tags(maildir)
        missing = set(acked) - set(delivered)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
        duplicates = sorted({t for t in delivered if delivered.count(t) > 1})
        assert not duplicates, f"delivered twice: {duplicates[:5]}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = b.admin("queue", "list")
            if "Mail queue is empty" in listing.stdout:
                break
            time.sleep(0.5)
        assert "Mail queue is empty" in listing.stdout, listing.stdout + listing.stderr
        b.stop()
        # The survivor finished work the killed node had accepted.
        log = b.log()
        done, queued = log.count('"event":"done"'), log.count('"event":"queued"')
        assert done > queued, f"the survivor finished {done}, accepted {queued}"
