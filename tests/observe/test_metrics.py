"""The metrics observer maps the stages' log events to series; the collector reads
live gauges from the service tree; each test has its own registry and publisher."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from twisted.logger import Logger, LogPublisher

from mta.observe.metrics import MetricsObserver, MetricsService, summary


class FakeRunner:
    running = True

    def depth(self):
        return {"incoming": 1, "active": 2, "ready": 3, "deferred": 4}


def session(listener: str):
    context = SimpleNamespace(listener=SimpleNamespace(name=listener))
    return SimpleNamespace(factory=SimpleNamespace(context=context), peer_ip="127.0.0.1")


def fake_root(sessions=()):
    listeners = (SimpleNamespace(name="smtp"), SimpleNamespace(name="submission"))
    return SimpleNamespace(
        config=SimpleNamespace(listeners=listeners),
        tracker=SimpleNamespace(sessions=list(sessions)),
        runner=FakeRunner(),
        spool=SimpleNamespace(backlog=lambda: 7),
    )


@pytest.fixture
def wired():
    registry = CollectorRegistry()
    publisher = LogPublisher()
    svc = MetricsService(fake_root([session("smtp"), session("smtp")]), registry, publisher)
    svc.startService()
    log = Logger(namespace="mta.test", observer=publisher)
    yield registry, log, svc
    if svc.running:
        svc.stopService()


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_accepted_counts_message_bytes_and_duration(wired):
    registry, log, _ = wired
    log.info("x", event="accepted", qid="q1", size=1200, duration=0.02)
    log.info("x", event="accepted", qid="q2", size=300, duration=3.0)
    assert value(registry, "smtp_messages_received_total") == 2
    assert value(registry, "smtp_received_bytes_total") == 1500
    assert value(registry, "smtp_processing_duration_seconds_count") == 2
    assert value(registry, "smtp_processing_duration_seconds_sum") == pytest.approx(3.02)
    assert value(registry, "smtp_processing_duration_seconds_bucket", le="0.025") == 1


def test_debug_events_count_too(wired):
    registry, log, _ = wired
    log.debug("x", event="queued", qid="q1")
    assert value(registry, "mta_queued_messages_total") == 1


def test_delivery_outcomes(wired):
    registry, log, _ = wired
    log.info("x", event="delivered", qid="q", recipients=["a@x", "b@x"])
    log.warn("x", event="failed", qid="q", recipients=["c@x"])
    log.info("x", event="deferred", qid="q")
    log.info("x", event="done", qid="q")
    log.warn("x", event="dead", qid="q")
    log.warn("x", event="expired", qid="q")
    log.info("x", event="bounced", qid="q")
    assert value(registry, "smtp_messages_sent_total", result="delivered") == 2
    assert value(registry, "smtp_messages_sent_total", result="failed") == 1
    assert value(registry, "mta_delivery_attempts_total", result="deferred") == 1
    assert value(registry, "mta_delivery_attempts_total", result="delivered") == 1
    assert value(registry, "mta_delivery_attempts_total", result="failed") == 1
    assert value(registry, "mta_dead_letters_total") == 1
    assert value(registry, "mta_expired_messages_total") == 1
    assert value(registry, "mta_bounces_total") == 1


def test_rejections_auth_connections_and_checks(wired):
    registry, log, _ = wired
    log.info("message rejected: too big", event="rejected", qid="q")
    log.info("x", event="rcpt_rejected", code=550)
    log.info("x", event="conn_refused", client="1.2.3.4")
    log.info("x", event="connect", listener="smtp")
    log.info("x", event="auth", result="failure")
    log.info("x", event="auth", result="success")
    log.info("x", event="auth", result="locked")
    log.info("x", event="check", check="spf", duration=0.004, result="pass")
    assert value(registry, "smtp_messages_rejected_total", reason="too_big") == 1
    assert value(registry, "smtp_recipients_rejected_total", code="550") == 1
    assert value(registry, "smtp_connections_refused_total") == 1
    assert value(registry, "smtp_connections_total", listener="smtp") == 1
    assert value(registry, "smtp_auth_attempts_total", result="failure") == 1
    assert value(registry, "smtp_auth_attempts_total", result="success") == 1
    assert value(registry, "smtp_auth_attempts_total", result="locked") == 1
    assert value(registry, "mta_check_duration_seconds_count", check="spf") == 1
    assert value(registry, "mta_check_results_total", check="spf", result="pass") == 1


def test_malformed_events_are_ignored(wired):
    registry, log, _ = wired
    log.info("x", event="accepted", size="big", duration="slow")
    log.info("x", event=42)
    log.info("no event at all")
    assert value(registry, "smtp_messages_received_total") == 1
    assert value(registry, "smtp_processing_duration_seconds_count") == 0


def test_errors_of_mta_are_counted_others_not(wired):
    registry, log, _ = wired
    log.error("boom")
    Logger(namespace="twisted.conch", observer=log.observer).error("remote went away")
    assert value(registry, "mta_log_errors_total") == 1


def test_live_gauges_from_the_service_tree(wired):
    registry, _, _ = wired
    assert value(registry, "smtp_connections_active", listener="smtp") == 2
    assert value(registry, "smtp_connections_active", listener="submission") == 0
    assert value(registry, "mta_queue_depth", state="deferred") == 4
    assert value(registry, "mta_spool_backlog") == 7
    text = generate_latest(registry).decode()
    assert 'smtp_connections_active{listener="smtp"} 2.0' in text
    assert "mta_build_info{version=" in text


def test_stopped_service_no_longer_observes(wired):
    registry, log, svc = wired
    svc.stopService()
    log.info("x", event="accepted", size=1, duration=0.1)
    assert value(registry, "smtp_messages_received_total") == 0


def test_registries_are_independent():
    a, b = CollectorRegistry(), CollectorRegistry()
    MetricsService(fake_root(), a, LogPublisher())
    MetricsService(fake_root(), b, LogPublisher())  # no duplicate-series error


def test_observer_survives_a_broken_metric():
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError(name)

    MetricsObserver(Broken())({"event": "accepted"})  # does not raise


def test_summary_is_flat_and_skips_buckets(wired):
    registry, log, _ = wired
    log.info("x", event="accepted", size=10, duration=0.1)
    stats = summary(registry)
    assert stats["smtp_messages_received_total"] == 1
    assert stats["mta_queue_depth{state=active}"] == 2
    assert not any("_bucket" in k for k in stats)


def test_one_event_for_several_checks_counts_each(wired):
    """Sender authentication logs a message's results in one `checks` event."""
    registry, log, _ = wired
    results = [
        {"check": "spf", "result": "pass", "duration": 0.002},
        {"check": "dkim", "result": "fail"},
        {"check": "dmarc", "result": "pass"},
        "not a mapping",
    ]
    log.info("x", event="checks", duration=0.01, results=results)
    log.info("x", event="checks", results=[{"check": "dkim", "result": "fail"}])
    assert value(registry, "mta_check_results_total", check="dkim", result="fail") == 2
    assert value(registry, "mta_check_results_total", check="spf", result="pass") == 1
    assert value(registry, "mta_check_duration_seconds_sum", check="spf") == 0.002
    assert value(registry, "mta_check_duration_seconds_sum", check="dmarc") == 0.01
    assert value(registry, "mta_check_duration_seconds_count", check="dkim") == 1
