"""Prometheus metrics, gathered from the side.

Nothing in the SMTP session, the spool or the queue runner knows about Prometheus.
They emit one `twisted.logger` event per state change (``event="accepted"``,
``"queued"``, ``"delivered"`` ...); `MetricsObserver` sits on the global log publisher
(before any level filter, so it sees debug events too) and turns those events into
counters and histograms.  Gauges that describe *now* (open connections, queue depth)
are read from the live service tree at scrape time by `ServiceCollector`.

Everything is registered on an explicit `CollectorRegistry`, so each test (and each
process) has its own.  With several worker processes each has its own registry; only
worker 0 serves it (see mta.observe.http).
"""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from twisted.application import service
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from zope.interface import implementer

import mta

# MAIL FROM to the 250 after DATA: mostly the client's speed and the fsync.
PROCESSING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHECK_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUEUE_STATES = ("incoming", "active", "ready", "deferred")


class Metrics:
    """Every series mta exports, declared on `registry`."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        r = registry
        self.received = Counter(
            "smtp_messages_received", "Messages accepted (250 after DATA)", registry=r
        )
        self.received_bytes = Counter(
            "smtp_received_bytes", "Bytes of accepted messages", registry=r
        )
        self.rejected = Counter(
            "smtp_messages_rejected", "Messages refused after DATA", ["reason"], registry=r
        )
        self.rcpt_rejected = Counter(
            "smtp_recipients_rejected", "RCPT TO refused", ["code"], registry=r
        )
        self.sent = Counter(
            "smtp_messages_sent",
            "Recipients whose delivery finished, by result (delivered, failed)",
            ["result"],
            registry=r,
        )
        self.connections = Counter(
            "smtp_connections", "SMTP connections accepted", ["listener"], registry=r
        )
        self.connections_refused = Counter(
            "smtp_connections_refused", "Connections refused over a limit", registry=r
        )
        self.auth = Counter("smtp_auth_attempts", "AUTH attempts by result", ["result"], registry=r)
        self.processing = Histogram(
            "smtp_processing_duration_seconds",
            "MAIL FROM to the 250 after DATA",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.queued = Counter("mta_queued_messages", "Messages committed to the spool", registry=r)
        self.spool_errors = Counter(
            "mta_spool_commit_errors", "Spool commits that failed", registry=r
        )
        self.attempts = Counter(
            "mta_delivery_attempts",
            "Delivery attempts by outcome (delivered, deferred, failed)",
            ["result"],
            registry=r,
        )
        self.bounces = Counter("mta_bounces", "Delivery status notifications generated", registry=r)
        self.dead_letters = Counter(
            "mta_dead_letters", "Messages moved to dead letters", registry=r
        )
        self.expired = Counter(
            "mta_expired_messages", "Messages that ran out of retry time", registry=r
        )
        self.check_latency = Histogram(
            "mta_check_duration_seconds",
            "Latency of one policy check (spf, dkim, dmarc, spamd, clamd ...)",
            ["check"],
            buckets=CHECK_BUCKETS,
            registry=r,
        )
        self.check_results = Counter(
            "mta_check_results", "Policy check verdicts", ["check", "result"], registry=r
        )
        self.log_errors = Counter(
            "mta_log_errors", "mta events logged at error level or above", registry=r
        )
        self.info = Gauge("mta_build_info", "Always 1; the version label", ["version"], registry=r)
        self.info.labels(version=mta.__version__).set(1)
        for result in ("delivered", "failed"):
            self.sent.labels(result=result)
        for result in ("delivered", "deferred", "failed"):
            self.attempts.labels(result=result)
        for result in ("success", "failure"):
            self.auth.labels(result=result)


def _count(value: Any) -> int:
    if isinstance(value, list | tuple):
        return len(value)
    return 1


@implementer(ILogObserver)
class MetricsObserver:
    """Maps log events (by their ``event`` field) to `metrics`.

    Events it understands, by the stage that emits them:
      session: accepted (duration, size), rejected (reason or the message), rcpt_rejected
      (code), connect (listener), auth (result: success | failure | locked);
      server: conn_refused; spool: queued, commit_failed;
      runner: delivered / failed (recipients), deferred, done, dead, expired;
      later stages: bounced, check (check, duration, result), checks (duration,
      results: a list of {check, result}).
    It never raises: a malformed event is ignored.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        # prometheus_client's labels() validates and locks on every call; a busy server
        # counts the same few label values all day, so each child is looked up once.
        self._children: dict[tuple, Any] = {}
        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "accepted": self._accepted,
            "rejected": self._rejected,
            "rcpt_rejected": self._rcpt_rejected,
            "connect": self._connected,
            "conn_refused": lambda e: self.metrics.connections_refused.inc(),
            "auth": self._auth,
            "queued": lambda e: self.metrics.queued.inc(),
            "commit_failed": lambda e: self.metrics.spool_errors.inc(),
            "delivered": self._recipients("delivered"),
            "failed": self._recipients("failed"),
            "deferred": lambda e: self._child(self.metrics.attempts, "deferred").inc(),
            "done": lambda e: self._child(self.metrics.attempts, "delivered").inc(),
            "dead": self._dead,
            "expired": lambda e: self.metrics.expired.inc(),
            "bounced": lambda e: self.metrics.bounces.inc(),
            "check": self._check,
            "checks": self._checks,
            # The pipeline's word on a check that timed out or broke.
            "policy_timeout": self._check_failed("timeout"),
            "policy_error": self._check_failed("error"),
        }

    def __call__(self, event: Mapping[str, Any]) -> None:
        try:
            level = getattr(event.get("log_level"), "name", "")
            namespace = str(event.get("log_namespace", ""))
            if level in ("error", "critical") and namespace.startswith("mta"):
                self.metrics.log_errors.inc()
            name = event.get("event")
            if not isinstance(name, str):
                return
            handler = self._handlers.get(name)
            if handler is not None:
                handler(event)
        except Exception:  # a metric must never break logging
            pass

    def _accepted(self, e: Mapping[str, Any]) -> None:
        m = self.metrics
        m.received.inc()
        size = e.get("size")
        if isinstance(size, int) and size >= 0:
            m.received_bytes.inc(size)
        duration = e.get("duration")
        if isinstance(duration, int | float) and duration >= 0:
            m.processing.observe(duration)

    def _rejected(self, e: Mapping[str, Any]) -> None:
        reason = e.get("reason")
        if not isinstance(reason, str):
            text = str(e.get("log_format") or "")
            reason = text.partition(": ")[2] or "other"
        self._child(self.metrics.rejected, reason.replace(" ", "_")[:40]).inc()

    def _rcpt_rejected(self, e: Mapping[str, Any]) -> None:
        self._child(self.metrics.rcpt_rejected, str(e.get("code", "unknown"))).inc()

    def _connected(self, e: Mapping[str, Any]) -> None:
        self._child(self.metrics.connections, str(e.get("listener", "unknown"))).inc()

    def _auth(self, e: Mapping[str, Any]) -> None:
        result = e.get("result")
        if result not in ("success", "failure", "locked"):
            result = "failure"
        self._child(self.metrics.auth, result).inc()

    def _recipients(self, result: str) -> Callable[[Mapping[str, Any]], None]:
        def handle(e: Mapping[str, Any]) -> None:
            self._child(self.metrics.sent, result).inc(_count(e.get("recipients")))

        return handle

    def _dead(self, e: Mapping[str, Any]) -> None:
        self.metrics.dead_letters.inc()
        self._child(self.metrics.attempts, "failed").inc()

    def _child(self, metric, *values: str):
        """`metric.labels(*values)`, looked up once per metric and values."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 10_000:  # label values from the outside: bounded
                self._children.clear()
            child = self._children[key] = metric.labels(*values)
        return child

    def _check(self, e: Mapping[str, Any]) -> None:
        self._one_check(str(e.get("check", "unknown")), e.get("result"), e.get("duration"))

    def _checks(self, e: Mapping[str, Any]) -> None:
        """Several checks' results in one event (`results`: their check, result and
        maybe duration; else the event's `duration` times them)."""
        duration = e.get("duration")
        for item in e.get("results") or ():
            if isinstance(item, Mapping):
                check = str(item.get("check", "unknown"))
                self._one_check(check, item.get("result"), item.get("duration", duration))

    def _one_check(self, check: str, result: Any, duration: Any) -> None:
        if isinstance(duration, int | float) and duration >= 0:
            self._child(self.metrics.check_latency, check).observe(duration)
        if isinstance(result, str):
            self._child(self.metrics.check_results, check, result).inc()

    def _check_failed(self, result: str) -> Callable[[Mapping[str, Any]], None]:
        def handle(e: Mapping[str, Any]) -> None:
            check = str(e.get("check", "unknown"))
            self._child(self.metrics.check_results, check, result).inc()

        return handle


class ServiceCollector:
    """Gauges read from the live service tree at scrape time (on the reactor thread)."""

    def __init__(self, root: Any):
        self.root = root

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        families = self._families()
        self._fill(*families)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("smtp_connections_active", "Open SMTP sessions", labels=["listener"]),
            GaugeMetricFamily("mta_queue_depth", "Queued messages by state", labels=["state"]),
            GaugeMetricFamily("mta_spool_backlog", "Messages in the spool not yet finished"),
        ]

    def _fill(self, connections, depth, backlog) -> None:
        root = self.root
        by_listener: _Tally[str] = _Tally(
            {lst.name: 0 for lst in getattr(root.config, "listeners", ())}
        )
        tracker = getattr(root, "tracker", None)
        for session in list(getattr(tracker, "sessions", ())):
            by_listener[_listener_of(session)] += 1
        for name, count in sorted(by_listener.items()):
            connections.add_metric([name], count)
        runner = getattr(root, "runner", None)
        states = dict.fromkeys(QUEUE_STATES, 0)
        if runner is not None:
            states.update(runner.depth())
        for state, count in states.items():
            depth.add_metric([state], count)
        spool = getattr(root, "spool", None)
        if spool is not None:
            backlog.add_metric([], spool.backlog())


def _listener_of(session: Any) -> str:
    try:
        return session.factory.context.listener.name
    except AttributeError:
        return "unknown"


class MetricsService(service.Service):
    """Attaches `MetricsObserver` to `publisher` while running and registers the
    `ServiceCollector` of `root` on the registry."""

    name = "metrics"

    def __init__(
        self,
        root: Any,
        registry: CollectorRegistry,
        publisher: LogPublisher = globalLogPublisher,
    ):
        self.registry = registry
        self.metrics = Metrics(registry)
        self.observer = MetricsObserver(self.metrics)
        self._publisher = publisher
        registry.register(ServiceCollector(root))

    def startService(self) -> None:
        super().startService()
        self._publisher.addObserver(self.observer)

    def stopService(self):
        self._publisher.removeObserver(self.observer)
        return super().stopService()


def summary(registry: CollectorRegistry) -> dict[str, float]:
    """Current values as ``{"name{label=value}": number}``, histogram buckets left out
    (the manhole's stats())."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out
