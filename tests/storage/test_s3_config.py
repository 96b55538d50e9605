"""`[storage.s3]`: what check-config says, how `open_store` builds the S3 store
(alone, per domain, encrypted), and that a server without S3 never loads botocore."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mta.config import ConfigError, build_config
from mta.envelope import Address
from mta.storage import StoreItem, open_store
from mta.storage.encrypted import EncryptingStore
from mta.storage.routing import RoutingStore
from mta.storage.s3store import S3Store
from mta.testing import MemoryBody
from tests.s3server import ACCESS_KEY, SECRET_KEY
from tests.storage.conftest import S3_BUCKET, s3_prefix


def config(tmp_path, s3=None, **storage):
    data = {
        "datadir": str(tmp_path / "data"),
        "local_domains": ["example.test", "other.test"],
        "postmaster": "bob@example.test",
        "storage": dict(storage),
    }
    if s3 is not None:
        data["storage"]["s3"] = s3
    return build_config(data, source=str(tmp_path / "mta.toml"))


def settings(tmp_path, endpoint="http://127.0.0.1:8333", **extra):
    secret = tmp_path / "s3.secret"
    if not secret.exists():
        secret.write_text(SECRET_KEY + "\n")
    return {
        "endpoint": endpoint,
        "bucket": S3_BUCKET,
        "access_key_id": ACCESS_KEY,
        "secret_access_key_file": str(secret),
        "prefix": s3_prefix(tmp_path),
        **extra,
    }


def errors(tmp_path, s3, **storage) -> dict[str, str]:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, s3, **storage)
    found = {}
    for line in str(e.value).splitlines():
        parts = line.split(": ", 2)
        if len(parts) == 3 and parts[1].startswith("storage"):
            found[parts[1]] = "; ".join(filter(None, [found.get(parts[1]), parts[2]]))
    return found


def test_a_complete_table_loads(tmp_path):
    cfg = config(tmp_path, settings(tmp_path, region="eu-west-1"), backend="s3")
    assert cfg.storage_s3.bucket == S3_BUCKET and cfg.storage_s3.region == "eu-west-1"
    assert cfg.storage_s3.retries == 4 and cfg.storage_s3.timeout == 30.0


def test_the_secret_path_is_under_the_datadir_unless_absolute(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "s3.secret").write_text("x\n")
    cfg = config(tmp_path, settings(tmp_path, secret_access_key_file="s3.secret"), backend="s3")
    assert cfg.storage_s3.secret_access_key_file == str(tmp_path / "data" / "s3.secret")


def test_what_s3_needs_is_required_only_when_a_backend_uses_it(tmp_path):
    assert config(tmp_path, {"bucket": "x"}).storage_s3.bucket == "x"  # maildir: unused
    found = errors(tmp_path, {}, backend="s3")
    assert set(found) == {
        "storage.s3.endpoint",
        "storage.s3.bucket",
        "storage.s3.access_key_id",
        "storage.s3.secret_access_key_file",
    }
    assert all('required with backend = "s3"' in text for text in found.values())
    per_domain = errors(tmp_path, {}, **{"other.test": {"backend": "s3"}})
    assert "storage.s3.endpoint" in per_domain


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("endpoint", "s3.example.test", "expected http(s)://host[:port]"),
        ("endpoint", "http://127.0.0.1:8333/bucket", "with no path"),
        ("endpoint", "http://127.0.0.1:99999", "bad port"),
        ("bucket", "Mail_Box", "is not an S3 bucket name"),
        ("bucket", "ab", "is not an S3 bucket name"),
        ("prefix", "/mail/", "must not start with '/'"),
        ("prefix", "mail//x/", "empty, '.' or '..'"),
        ("prefix", "a/../b/", "empty, '.' or '..'"),
        ("prefix", "a\nb", "printable"),
        ("timeout", 0, "positive"),
        ("retries", 99, "from 0 to 20"),
        ("retries", "3", "must be an integer"),
        ("region", "", "required"),
        ("access_key_id", 5, "must be a string"),
        ("colour", "blue", "unknown key"),
    ],
)
def test_bad_values_are_named(tmp_path, key, value, message):
    found = errors(tmp_path, settings(tmp_path, **{key: value}), backend="s3")
    assert message in found[f"storage.s3.{key}"], found


def test_a_secret_file_that_cannot_be_read_or_is_empty(tmp_path):
    found = errors(tmp_path, settings(tmp_path, secret_access_key_file=str(tmp_path)), backend="s3")
    assert found["storage.s3.secret_access_key_file"] == f"cannot read {tmp_path}: Is a directory"
    (tmp_path / "empty").write_text("\n")
    s3 = settings(tmp_path, secret_access_key_file=str(tmp_path / "empty"))
    assert "is empty" in errors(tmp_path, s3, backend="s3")["storage.s3.secret_access_key_file"]


def test_open_store_builds_the_s3_store(s3_server, tmp_path):
    store = open_store(config(tmp_path, settings(tmp_path, s3_server.endpoint), backend="s3"))
    try:
        assert isinstance(store, S3Store) and store.keyring is None
        assert S3_BUCKET in store.probe()
    finally:
        store.close()


def test_one_domain_in_s3_encrypted_beside_an_encrypted_maildir(s3_server, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "master.key").write_bytes(bytes(range(32)))
    cfg = config(
        tmp_path,
        settings(tmp_path, s3_server.endpoint),
        encrypt=True,
        master_key_file="master.key",
        **{"other.test": {"backend": "s3"}},
    )
    store = open_store(cfg)
    assert isinstance(store, RoutingStore)
    s3 = store.store_for(Address("dave", "other.test"))
    assert isinstance(s3, S3Store) and s3.keyring is not None  # seals its objects itself
    assert isinstance(store.default, EncryptingStore)
    message = b"Subject: routed\r\n\r\nhello\r\n"
    boxes = [Address("bob", "example.test"), Address("dave", "other.test")]
    items = [StoreItem(box, f"00ab-{i}", b"", MemoryBody(message)) for i, box in enumerate(boxes)]
    try:
        outcomes = store.deliver_batch(items)
        assert "/mail/example.test/bob/new/" in outcomes[0], outcomes
        assert outcomes[1].startswith("s3:"), outcomes
        for box in boxes:
            [msg] = store.list_messages(box)
            assert store.read_message(box, msg.message_id) == message
        assert s3.call(s3.client.list_keys, s3.prefix) != []
        assert "encrypted" in store.probe()
    finally:
        s3.close()


def test_a_server_without_s3_never_imports_botocore(tmp_path):
    code = (
        "import sys\n"
        "from mta.config import build_config\n"
        "from mta.storage import open_store\n"
        "import mta.app, mta.admin.cli\n"
        f"store = open_store(build_config({{'datadir': {str(tmp_path)!r}}}))\n"
        "assert store.name == 'maildir'\n"
        "print(sorted(m for m in sys.modules if m.startswith(('botocore', 'treq'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
