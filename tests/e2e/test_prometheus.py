"""End to end: a real Prometheus server scrapes a real `twistd mta`; /readyz turns 503
when the spool cannot take files; the shipped alert rules pass `promtool check rules`."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, free_port, require_tool

pytestmark = pytest.mark.e2e

POLL_TIMEOUT = 60.0
SERIES = (
    "smtp_messages_received_total",
    'smtp_messages_sent_total{result="delivered"}',
    "smtp_connections_active",
    "smtp_auth_attempts_total",
    "smtp_processing_duration_seconds_count",
    "mta_queue_depth",
    "mta_delivery_attempts_total",
)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def send(server, count: int = 1) -> None:
    with smtplib.SMTP(server.host, server.smtp_port, timeout=30) as client:
        for i in range(count):
            client.sendmail(
                "sender@remote.test",
                ["postmaster@localhost"],
                f"Subject: metrics {i}\r\n\r\nhello\r\n".encode(),
            )


class Prometheus:
    """`prometheus` on a loopback port, scraping `target` every second; its own
    config and data directory; stopped by its own pid."""

    def __init__(self, root: Path, target: str):
        self.binary = require_tool("prometheus")
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: mta\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log_path = root / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + POLL_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()}")
            try:
                if http_get(self.url + "/-/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready: {self.log_path.read_text()}")

    def query(self, expr: str) -> list:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    def wait_for(self, expr: str, predicate=bool) -> list:
        deadline = time.monotonic() + POLL_TIMEOUT
        result: list = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result and predicate(result):
                return result
            time.sleep(0.2)
        raise AssertionError(f"{expr}: {result} after {POLL_TIMEOUT}s\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture
def prometheus_factory(tmp_path):
    started: list[Prometheus] = []

    def make(target: str) -> Prometheus:
        p = Prometheus(tmp_path / "prometheus", target)
        started.append(p)
        return p.start()

    yield make
    for p in started:
        p.stop()


def test_prometheus_scrapes_the_series(mta_server, prometheus_factory):
    send(mta_server, 3)
    prom = prometheus_factory(f"127.0.0.1:{mta_server.http_port}")
    prom.wait_for('up{job="mta"}', lambda r: r[0]["value"][1] == "1")
    received = prom.wait_for("smtp_messages_received_total", lambda r: float(r[0]["value"][1]) >= 3)
    assert received[0]["metric"]["job"] == "mta"
    prom.wait_for(
        'smtp_messages_sent_total{result="delivered"}', lambda r: float(r[0]["value"][1]) >= 3
    )
    for series in SERIES:
        assert prom.query(series), series
    listeners = {r["metric"]["listener"] for r in prom.query("smtp_connections_active")}
    assert listeners == {"smtp", "submission", "smtps"}
    states = {r["metric"]["state"] for r in prom.query("mta_queue_depth")}
    assert states == {"incoming", "active", "ready", "deferred"}
    p50 = prom.query("histogram_quantile(0.5, smtp_processing_duration_seconds_bucket)")
    assert p50 and float(p50[0]["value"][1]) > 0


def test_readyz_turns_503_when_the_spool_is_not_a_directory(mta_server):
    base = f"http://127.0.0.1:{mta_server.http_port}"
    assert http_get(base + "/healthz") == (200, b'{"status":"ok"}\n')
    # Ready shortly after start (the directory and queue load in threads): poll, bounded.
    deadline = time.monotonic() + 30
    status, body = http_get(base + "/readyz")
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
        status, body = http_get(base + "/readyz")
    assert status == 200, body
    # chmod does not stop root; a file where the directory was stops everyone.
    active = mta_server.datadir / "queue" / "active"
    os.rename(active, active.with_name("active.moved"))
    active.write_text("")
    try:
        status, body = http_get(base + "/readyz")
        assert status == 503, body
        report = json.loads(body)
        assert report["checks"]["spool"]["status"] == "fail"
        assert report["checks"]["database"]["status"] == "ok"
        assert report["checks"]["storage"]["status"] == "ok"
        assert http_get(base + "/healthz")[0] == 200  # alive, just not ready
    finally:
        active.unlink()
        os.rename(active.with_name("active.moved"), active)
    assert http_get(base + "/readyz")[0] == 200


def test_alert_rules_pass_promtool():
    promtool = require_tool("promtool")
    rules = REPO_ROOT / "etc" / "prometheus" / "alerts.yml"
    out = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout + out.stderr


def test_grafana_dashboard_queries_exported_series():
    dashboard = json.loads((REPO_ROOT / "etc" / "grafana" / "mta-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    text = " ".join(exprs)
    for name in (
        "smtp_messages_received_total",
        "smtp_processing_duration_seconds_bucket",
        "mta_queue_depth",
        "smtp_auth_attempts_total",
    ):
        assert name in text
