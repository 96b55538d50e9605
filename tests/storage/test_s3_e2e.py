"""End to end: `twistd mta` with ``[storage] backend = "s3"`` on a real SeaweedFS.

Mail received over SMTP (smtplib) lands as one object for all its local recipients;
`mta-admin mail cat` prints it byte for byte, `mail list`, `search`, `export` and
`delete` work on it, with the index in ``mta.db`` and in the PostgreSQL of
``[database] dsn``; `check-config` names a broken ``[storage.s3]``; with S3
unreachable the message stays queued and /readyz says why, until S3 is back.
"""

from __future__ import annotations

import json
import smtplib
import time
import urllib.error
import urllib.request

from tests.conftest import free_port
from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Proxy
from tests.storage.conftest import S3_BUCKET, make_client, s3_prefix

TIMEOUT = 60.0
MESSAGE = (
    b"From: Sender <sender@remote.test>\r\nTo: bob@example.test, carol@example.test\r\n"
    b"Subject: s3 e2e lighthouse\r\nMessage-ID: <e2e-s3-1@remote.test>\r\n\r\n"
    b"Hello \xc3\xa9 8-bit \x80\r\n.leading dot survives\r\n" + b"y" * 3000 + b"\r\n"
)


def s3_config(tmp_path, endpoint: str, **extra) -> dict:
    secret = tmp_path / "s3.secret"
    secret.write_text(SECRET_KEY + "\n")
    secret.chmod(0o600)
    settings = {
        "endpoint": endpoint,
        "bucket": S3_BUCKET,
        "prefix": s3_prefix(tmp_path),
        "access_key_id": ACCESS_KEY,
        "secret_access_key_file": str(secret),
        **extra,
    }
    return {"storage": {"backend": "s3", "s3": settings}}


def add_users(server, *emails):
    for email in emails:
        server.admin("user", "add", email, "--no-password", check=True)


def wait_listed(server, email: str) -> list[str]:
    deadline = time.monotonic() + TIMEOUT
    out = ""
    while time.monotonic() < deadline:
        out = server.admin("mail", "list", email).stdout
        ids = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
        if ids and not out.startswith("No mail"):
            return ids
        time.sleep(0.1)
    raise AssertionError(f"no mail for {email} after {TIMEOUT}s: {out}\n{server.log()[-3000:]}")


def cat(server, email: str, message_id: str) -> bytes:
    import subprocess

    from tests.conftest import MTA_ADMIN

    return subprocess.run(
        [*MTA_ADMIN, "--config", str(server.config_path), "mail", "cat", email, message_id],
        env=server.env(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def test_received_mail_is_one_object_and_reads_back_byte_exact(
    s3_server, mta_server_factory, tmp_path, s3_index
):
    config = s3_config(tmp_path, s3_server.endpoint)
    if s3_index is not None:  # users, aliases and the index in PostgreSQL
        config["database"] = {"dsn": s3_index}
    server = mta_server_factory(config, start=False)
    add_users(server, "bob@example.test", "carol@example.test")
    server.start()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        refused = client.sendmail(
            "sender@remote.test", ["bob@example.test", "carol@example.test"], MESSAGE
        )
        assert refused == {}
    for email in ("bob@example.test", "carol@example.test"):
        [message_id] = wait_listed(server, email)
        data = cat(server, email, message_id)
        head = f"Return-Path: <sender@remote.test>\r\nDelivered-To: {email}\r\nReceived: ".encode()
        assert data.startswith(head) and data.endswith(b"\r\n" + MESSAGE)
        received = data[len(head) - len(b"Received: ") : -len(MESSAGE)]
        assert received.startswith(b"Received: from ") and received.count(b"\r\nReceived:") == 0
    # One object for both recipients, holding the message below the two own lines.
    from mta.s3.reactor import ReactorThread

    thread = ReactorThread()
    try:
        client = make_client(thread.reactor, s3_server.endpoint)
        [key] = thread.call(client.list_keys, s3_prefix(tmp_path))
        assert key.endswith("e2e-s3-1@remote.test~" + key.rpartition("~")[2])
        obj = thread.call(client.get_object, key)
        assert obj.startswith(b"Received: from ") and obj.endswith(b"\r\n" + MESSAGE)
    finally:
        thread.stop()
    found = server.admin("search", "lighthouse", check=True).stdout
    assert "s3 e2e lighthouse" in found and "bob@example.test" in found
    export = tmp_path / "export"
    out = server.admin("mail", "export", "bob@example.test", "--format", "mbox", str(export))
    assert out.returncode == 0 and "exported 1 message" in out.stdout, out.stderr
    [bob_id] = wait_listed(server, "bob@example.test")
    deleted = server.admin("mail", "delete", "bob@example.test", bob_id)
    assert deleted.returncode == 0, deleted.stderr
    assert server.admin("mail", "list", "bob@example.test").stdout.startswith("No mail")
    assert (server.datadir / "mta.db").exists() == (s3_index is None)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_s3_down_keeps_the_message_queued_and_readyz_says_why(
    s3_server, mta_server_factory, tmp_path
):
    port = free_port()  # nothing listens there (yet)
    endpoint = f"http://127.0.0.1:{port}"
    config = s3_config(tmp_path, endpoint, retries=1)
    config["queue"] = {"retry_schedule": [1.0]}
    server = mta_server_factory(config, start=False)
    add_users(server, "bob@example.test")
    server.start()
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        assert client.sendmail("sender@remote.test", ["bob@example.test"], MESSAGE) == {}
    deadline = time.monotonic() + TIMEOUT
    deferred: list[str] = []
    while time.monotonic() < deadline and not deferred:
        lines = server.admin("queue", "list").stdout.splitlines()
        deferred = [p[0] for p in map(str.split, lines) if len(p) >= 2 and p[1] == "deferred"]
        time.sleep(0.1)
    [qid] = deferred
    shown = server.admin("queue", "show", qid)
    assert "unreachable: connection refused" in shown.stdout, shown.stdout
    status, body = http_get(f"http://127.0.0.1:{server.http_port}/readyz")
    assert status == 503, body
    storage = json.loads(body)["checks"]["storage"]
    assert storage["status"] == "fail"
    assert storage["detail"] == f"s3: {endpoint}/{S3_BUCKET} unreachable: connection refused"
    # S3 comes back (a forwarder to the real server on that port): the next attempt
    # delivers the message that waited in the queue.
    proxy = S3Proxy(int(s3_server.endpoint.rpartition(":")[2]), fail=0, port=port)
    try:
        [message_id] = wait_listed(server, "bob@example.test")
        assert cat(server, "bob@example.test", message_id).endswith(b"\r\n" + MESSAGE)
        status, body = http_get(f"http://127.0.0.1:{server.http_port}/readyz")
        assert status == 200, body
    finally:
        proxy.close()


def test_check_config_names_s3_problems(mta_server_factory, tmp_path):
    config = s3_config(tmp_path, "ftp://127.0.0.1/x")
    config["storage"]["s3"]["secret_access_key_file"] = str(tmp_path / "missing.secret")
    config["storage"]["s3"]["bucket"] = "Bad_Bucket"
    server = mta_server_factory(config, start=False)
    out = server.admin("check-config", str(server.config_path))
    assert out.returncode == 1
    assert "storage.s3.endpoint: expected http(s)://host[:port]" in out.stderr
    assert "storage.s3.bucket: 'Bad_Bucket' is not an S3 bucket name" in out.stderr
    assert (
        f"storage.s3.secret_access_key_file: cannot read {tmp_path / 'missing.secret'}:"
        " No such file or directory" in out.stderr
    )
