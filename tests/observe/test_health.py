"""Liveness and readiness: heartbeat logic on a Clock; probes on real directories and
a real SQLite file in a real thread pool; the endpoints over real twisted.web on
loopback, fetched with twisted.web.client.Agent."""

from __future__ import annotations

import json
import os
import sqlite3
from types import SimpleNamespace

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer, task
from twisted.python.threadpool import ThreadPool
from twisted.web.client import Agent, readBody

from mta.observe.health import (
    Health,
    probe_database,
    probe_directory_writable,
    service_checks,
    service_probes,
)
from mta.observe.http import HTTPService, make_site
from mta.queue.filestore import FileQueueStore
from mta.storage.maildir import MaildirStore


def test_liveness_follows_the_heartbeat():
    clock = task.Clock()
    health = Health(clock, None, stall_after=10.0)
    assert health.liveness().ok  # not started yet
    health.start(interval=1.0)
    clock.advance(5)
    report = health.liveness()
    assert report.code == 200 and report.as_json() == {"status": "ok"}
    # The reactor stalls: time passes without the heartbeat running.
    clock.rightNow += 30
    report = health.liveness()
    assert report.code == 503
    assert report.as_json()["checks"]["reactor"]["status"] == "fail"
    health.stop()


def test_directory_probe(tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "active").mkdir()
    assert probe_directory_writable(str(tmp_path / "tmp"), str(tmp_path / "active"))
    assert not list((tmp_path / "active").iterdir()) and not list((tmp_path / "tmp").iterdir())
    # Replaced by a file: fails even as root (permissions would not).
    (tmp_path / "active").rmdir()
    (tmp_path / "active").write_text("")
    with pytest.raises(OSError):
        probe_directory_writable(str(tmp_path / "tmp"), str(tmp_path / "active"))
    assert not list((tmp_path / "tmp").iterdir())


def test_database_probe(tmp_path):
    path = tmp_path / "mta.db"
    with pytest.raises(OSError):
        probe_database(str(path))
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert probe_database(str(path)) == "reachable"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        probe_database(str(path))


@pytest.fixture
def pool():
    pool = ThreadPool(minthreads=0, maxthreads=2, name="test-health")
    pool.start()
    yield pool
    pool.stop()


def tree(tmp_path):
    queue = tmp_path / "queue"
    for d in ("tmp", "active"):
        (queue / d).mkdir(parents=True)
    db = tmp_path / "mta.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    runner = SimpleNamespace(running=True, recovery=defer.succeed(None))
    spool = FileQueueStore(str(queue), None, None)
    store = MaildirStore(str(tmp_path / "mail"))
    root = SimpleNamespace(spool=spool, runner=runner, store=store)
    return root, str(db), str(tmp_path / "mail")


def service_health(tmp_path, reactor, pool):
    root, db, mail = tree(tmp_path)
    health = Health(
        reactor,
        pool,
        probes=service_probes(root, database=db),
        checks=service_checks(root),
    )
    return root, health


@pytest.fixture
def http(tmp_path, pool):
    from twisted.internet import reactor

    root, health = service_health(tmp_path, reactor, pool)
    registry = CollectorRegistry()
    Counter("smtp_messages_received", "test", registry=registry).inc(3)
    svc = HTTPService("127.0.0.1", 0, make_site(registry, health), reactor, health)
    svc.startService()
    base = f"http://127.0.0.1:{svc.port.getHost().port}"
    yield root, base, Agent(reactor)
    pytest_twisted.blockon(defer.maybeDeferred(svc.stopService))


async def get(agent, url, method=b"GET"):
    response = await agent.request(method, url.encode())
    body = await readBody(response)
    return response, body


@pytest_twisted.ensureDeferred
async def test_healthz(http):
    _, base, agent = http
    response, body = await get(agent, base + "/healthz")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert json.loads(body) == {"status": "ok"}


@pytest_twisted.ensureDeferred
async def test_readyz_ok_then_503_when_the_spool_is_not_a_directory(http):
    root, base, agent = http
    response, body = await get(agent, base + "/readyz")
    assert response.code == 200, body
    report = json.loads(body)
    assert report["status"] == "ok"
    assert set(report["checks"]) == {"spool", "database", "storage", "queue_runner"}

    active = root.spool.spool.active_dir
    os.rmdir(active)
    with open(active, "w"):
        pass
    response, body = await get(agent, base + "/readyz")
    assert response.code == 503
    report = json.loads(body)
    assert report["status"] == "fail"
    assert report["checks"]["spool"]["status"] == "fail"
    assert "Not a directory" in report["checks"]["spool"]["detail"]
    assert report["checks"]["database"]["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_readyz_503_when_the_runner_stopped(http):
    root, base, agent = http
    root.runner.running = False
    response, body = await get(agent, base + "/readyz")
    assert response.code == 503
    assert json.loads(body)["checks"]["queue_runner"]["detail"] == "queue runner not running"


@pytest_twisted.ensureDeferred
async def test_metrics_and_unknown_paths(http):
    _, base, agent = http
    response, body = await get(agent, base + "/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert b"smtp_messages_received_total 3.0" in body
    response, _ = await get(agent, base + "/nothing")
    assert response.code == 404
    response, _ = await get(agent, base + "/healthz", method=b"POST")
    assert response.code == 405


def test_a_hung_probe_times_out(pool):
    clock = task.Clock()
    calls = []

    def probe():  # never called: the Clock-driven timeout fires first
        calls.append(1)
        return "ok"

    class NeverRuns:
        def callInThreadWithCallback(self, *a, **kw):
            pass

    health = Health(clock, NeverRuns(), probes={"spool": probe}, timeout=5.0)
    d = defer.Deferred.fromCoroutine(health.readiness())
    clock.advance(6)
    report = d.result
    assert report.code == 503
    assert report.checks[0].detail == "no answer within 5s"
