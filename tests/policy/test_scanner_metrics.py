"""The spamd and clamd checks' log events feed `mta_check_results_total` and
`mta_check_duration_seconds` (through MetricsObserver, like every other metric)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from mta.observe.metrics import Metrics, MetricsObserver
from mta.policy.clamd import ClamdClient, ScanResult, VirusCheck
from mta.policy.pipeline import PolicyPipeline
from mta.policy.spamd import SpamCheck, SpamdClient, SpamResult
from mta.policy.verdict import Phase, PolicyContext


class HangingClient:
    def scan(self, body):
        return defer.Deferred()


def test_verdicts_timeouts_and_durations_become_metrics():
    registry = CollectorRegistry()
    observer = MetricsObserver(Metrics(registry))
    globalLogPublisher.addObserver(observer)
    try:
        VirusCheck(ClamdClient(None, None)).verdict(ScanResult("X"), "Q1", 0.02)
        VirusCheck(ClamdClient(None, None)).verdict(ScanResult(None), "Q2", 0.01)
        SpamCheck(SpamdClient(None), None).verdict(SpamResult(True, 9.0, 5.0), "Q3", 0.5)
        clock = task.Clock()
        pipeline = PolicyPipeline([VirusCheck(HangingClient())], clock, timeout=5)
        d = pipeline.run(Phase.DATA, PolicyContext("192.0.2.1", "smtp", body=object()))
        clock.advance(6)
        assert d.called
    finally:
        globalLogPublisher.removeObserver(observer)

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    results = "mta_check_results_total"
    assert value(results, check="clamd", result="infected") == 1
    assert value(results, check="clamd", result="clean") == 1
    assert value(results, check="clamd", result="timeout") == 1
    assert value(results, check="spamd", result="spam") == 1
    assert value("mta_check_duration_seconds_count", check="clamd") == 2
    assert value("mta_check_duration_seconds_sum", check="spamd") == 0.5
