"""The `[http]` listener: /metrics, /healthz and /readyz on twisted.web.

/metrics is the Prometheus text format of one explicit registry.  /healthz and
/readyz answer JSON with 200 when healthy and 503 otherwise (`mta.observe.health`).
Nothing else is served: any other path is a 404, any method but GET/HEAD a 405.
"""

from __future__ import annotations

import json

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.application import service
from twisted.internet import defer
from twisted.web import resource, server

from mta.observe.health import Health, Report
from mta.observe.logging import Logger

log = Logger()


def _json(request, report: Report) -> bytes:
    request.setResponseCode(report.code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(report.as_json(), separators=(",", ":")).encode() + b"\n"


class _Leaf(resource.Resource):
    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def render(self, request):
        if request.method not in self.allowedMethods:
            request.setResponseCode(405)
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            request.setHeader(b"content-type", b"text/plain")
            return b"method not allowed\n"
        return super().render(request)


class _NotFound(_Leaf):
    def render_GET(self, request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"not found: try /metrics, /healthz or /readyz\n"


class _Root(resource.Resource):
    def getChild(self, path, request):
        return _NotFound()


class MetricsResource(_Leaf):
    def __init__(self, registry: CollectorRegistry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class HealthzResource(_Leaf):
    def __init__(self, health: Health):
        super().__init__()
        self.health = health

    def render_GET(self, request) -> bytes:
        return _json(request, self.health.liveness())


class ReadyzResource(_Leaf):
    def __init__(self, health: Health):
        super().__init__()
        self.health = health

    def render_GET(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(report: Report) -> None:
            if gone:
                return
            if not report.ok:
                log.warn(
                    "not ready: {failed}",
                    failed=[c.name for c in report.checks if not c.ok],
                    event="not_ready",
                )
            request.write(_json(request, report))
            request.finish()

        d = defer.Deferred.fromCoroutine(self.health.readiness())
        d.addCallback(answer)
        d.addErrback(lambda f: log.failure("readiness check failed", f))
        return server.NOT_DONE_YET


class _QuietSite(server.Site):
    """No access log: a scrape a second would drown the mail log."""

    def log(self, request) -> None:
        pass


def make_site(registry: CollectorRegistry, health: Health) -> server.Site:
    root = _Root()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", HealthzResource(health))
    root.putChild(b"readyz", ReadyzResource(health))
    site = _QuietSite(root)
    site.displayTracebacks = False
    site.noisy = False
    return site


class HTTPService(service.Service):
    """Listens on `host`:`port` (0 picks a free port: see `.port.getHost()`)."""

    name = "http"

    def __init__(self, host: str, port: int, site: server.Site, reactor, health: Health):
        self.host = host
        self.portnum = port
        self.site = site
        self.reactor = reactor
        self.health = health
        self.port = None

    def startService(self) -> None:
        self.port = self.reactor.listenTCP(self.portnum, self.site, interface=self.host)
        self.health.start()
        super().startService()
        log.info(
            "http on {host}:{port}: /metrics /healthz /readyz",
            host=self.host,
            port=self.port.getHost().port,
        )

    def stopService(self):
        super().stopService()
        self.health.stop()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
