"""The composition root: one validated `Config` in, the whole service tree out.

Children start in the order added and stop in reverse (MultiService), so thread pools
come up first and go down last, the directory and the queue are ready before any
listener accepts a connection, and listeners close before the queue stops.  A
listener that cannot bind fails `startService`, which stops twistd with the reason.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from functools import partial

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import ILogObserver
from twisted.python.components import Componentized
from twisted.python.threadpool import ThreadPool

from mta.config import Config, ConfigError, load_config
from mta.db import DatabaseHandle, auto_migrate, database_location, is_postgres
from mta.db.directory import UserDirectory
from mta.delivery.dkim import DKIMSigner
from mta.delivery.local import LocalDelivery
from mta.delivery.mx import MXResolver
from mta.delivery.quarantine import QuarantineAgent
from mta.delivery.relay import RelayDelivery
from mta.delivery.router import Router
from mta.delivery.smtpclient import Timeouts
from mta.dns import make_resolver
from mta.observe.logging import Logger, make_observer
from mta.policy.compose import policy_pipeline
from mta.policy.lockout import LockoutRules, LockoutTracker
from mta.policy.pipeline import PolicyPipeline
from mta.policy.ratelimit import RateBuckets
from mta.policy.sender import SenderPolicy
from mta.process.balance import Balancer
from mta.process.threads import ThreadPoolService, WorkThreads
from mta.process.workers import WorkerSupervisor
from mta.queue import adopt_orphaned_queues, open_queue_control, open_queue_store
from mta.queue.bounce import Bouncer
from mta.queue.control import QueueControl
from mta.queue.runner import QueueRunner
from mta.smtp.auth import Argon2idChecker, AuditLog, Authenticator
from mta.smtp.server import ConnectionTracker, ListenerService, SMTPFactory
from mta.smtp.session import SessionContext
from mta.smtp.tls import server_context
from mta.storage import open_store
from mta.storage.quota import QuotaStore

log = Logger()


class MTAService(service.MultiService):
    """The root service; the manhole and admin tools find every stage through it."""

    def __init__(self, config: Config, reactor=None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.spool = None  # the IQueueStore (its receiving side is what sessions use)
        self.runner = None
        self.store = None  # the IMailStore
        self.queue_control = None  # the IQueueControl (manhole)
        self.dkim = None
        self.directory = None
        self.tracker = None
        self.tls = None
        self.database = None  # the DatabaseHandle (users, aliases, lockouts, audit)

    def setServiceParent(self, parent):
        # twistd builds the Application around the service makeService returns and
        # then asks it for an ILogObserver: this is where `[log]` takes effect.
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(
                ILogObserver,
                make_observer(self.config.log.format, self.config.log.level, sys.stdout),
            )
        return super().setServiceParent(parent)

    def startService(self):
        log.info(
            "mta starting: hostname {hostname}, data in {datadir}, local domains {domains}",
            hostname=self.config.hostname,
            datadir=self.config.datadir,
            domains=list(self.config.local_domains),
        )
        super().startService()
        if self.reactor is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
            # Everything built so far lives as long as the process: move it out of the
            # cyclic collector's way, so full collections scan only per-message garbage.
            gc.freeze()

    def reload(self) -> None:
        """SIGHUP (systemctl reload): re-read the TLS certificate and key.  New
        handshakes use them; established connections keep theirs.  Worker processes
        get the signal passed on."""
        log.info("reloading on SIGHUP", event="reload")
        if self.tls is not None:
            self.tls.reload()
        if self.dkim is not None:
            self.dkim.reload()
        watcher = self.namedServices.get("config-watcher")
        if watcher is not None:
            watcher.check(force=True)
        supervisor = self.namedServices.get("workers")
        if supervisor is not None:
            supervisor.signal_all("HUP")

    def stopService(self):
        """Stop children one at a time in reverse order, each after the previous has
        finished: listeners close, then the queue drains its in-flight work while
        the thread pools it needs are still running."""
        return defer.ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        service.Service.stopService(self)
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)
        log.info("mta stopped")


class _BalancerService(service.Service):
    """Adopts connections other workers hand over while the listeners run."""

    name = "balancer"

    def __init__(self, balancer):
        self.balancer = balancer

    def startService(self):
        super().startService()
        self.balancer.start()

    def stopService(self):
        super().stopService()
        self.balancer.close()


class _Closing(service.Service):
    """Runs `close` when the tree stops (placed early, so it stops late)."""

    def __init__(self, close):
        self._close = close

    def stopService(self):
        super().stopService()
        self._close()


class ConfigWatcher(service.Service):
    """Pushes settings that may change without a restart (``[dkim]``) to the stages
    that use them: the config file is checked once a second (a stat on the reactor;
    a changed file is parsed on `pool`), and at once on SIGHUP (`check(force=True)`).
    A file that no longer validates keeps the current settings, with one error."""

    name = "config-watcher"

    def __init__(self, config: Config, reactor, pool, signer, *, interval: float = 1.0):
        self.source = config.source if os.path.isfile(config.source) else None
        self.datadir = config.datadir
        self.reactor = reactor
        self.pool = pool
        self.signer = signer
        self.interval = interval
        self._mtime: int | None = None
        self._loop = None

    def startService(self):
        super().startService()
        if self.source is None:
            return
        self._mtime = self._stat()
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("config watcher stopped", failure=f)
        )

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _stat(self) -> int | None:
        try:
            return os.stat(self.source).st_mtime_ns
        except OSError as e:
            log.warn("cannot stat {path}: {error}", path=self.source, error=str(e))
            return None

    def check(self, force: bool = False):
        if self.source is None:
            return None
        mtime = self._stat()
        if mtime is None or (mtime == self._mtime and not force):
            return None
        self._mtime = mtime
        d = threads.deferToThreadPool(
            self.reactor, self.pool, load_config, self.source, datadir=self.datadir
        )
        d.addCallbacks(self._loaded, self._invalid)
        return d

    def _loaded(self, config: Config) -> None:
        self.signer.update(config.dkim)

    def _invalid(self, failure) -> None:
        if failure.check(ConfigError):
            log.error(
                "keeping the current [dkim] settings: {error}",
                error=failure.getErrorMessage(),
                event="dkim_reload",
            )
        else:
            log.failure("re-reading the configuration failed", failure=failure)


def _submission(config: Config, reactor, root, database, db_pool, auth_pool):
    """AUTH (Argon2id checker, lockouts, audit log) and the sender-ownership rule."""

    def run_db(f, *args):
        return threads.deferToThreadPool(reactor, db_pool, f, *args)

    def run_auth(f, *args):
        return threads.deferToThreadPool(reactor, auth_pool, f, *args)

    lockouts = LockoutTracker(database, run_db, reactor, LockoutRules.from_config(config.auth))
    lockouts.setServiceParent(root)
    checker = Argon2idChecker.from_config(config.auth, database, run_auth)
    authenticator = Authenticator(checker, lockouts, AuditLog(database, run_db), reactor)
    return authenticator, SenderPolicy(database, run_db)


def _pool(name: str, size: int) -> ThreadPool:
    pool = ThreadPool(minthreads=0, maxthreads=size, name=f"mta-{name}")
    return pool


def _thread_pools(root: MTAService, config: Config) -> dict:
    """Every thread pool, started first and stopped last with the tree.

    Group-commit batches run `io_lanes` at a time (spool, status, removal) per
    worker.  The spool and delivery pools hop to a thread several times per message:
    lean threads (see mta.process.threads) rather than Twisted's ThreadPool.  Argon2id
    verifies (~64 MB and ~0.2 s each) get their own bounded pool."""
    lanes = max(1, config.queue.io_lanes)
    pools = {
        "spool": WorkThreads("mta-spool", 2 + lanes),
        "delivery": WorkThreads("mta-delivery", 2 + 2 * lanes),
        "db": _pool("db", 2),
        "auth": _pool("auth", config.auth.threads),
        "dkim": _pool("dkim", 2),
        # message reads for clamd/spamd, MIME and zip parsing; pyspf and dkimpy (blocking
        # DNS and hashing): one or two hops per message, so lean threads too
        "checks": WorkThreads("mta-checks", 4),
        "sender-auth": WorkThreads("mta-sender-auth", 4),
    }
    for pool in pools.values():
        ThreadPoolService(pool).setServiceParent(root)
    return pools


def _at_rest_keyring(config: Config):
    """The master keys when encryption at rest is on anywhere (the quarantine seals
    its message files then), else None."""
    if not (config.storage.encrypt or config.queue.encrypt):
        return None
    from mta.crypto.keys import open_keyring

    return open_keyring(config)


def _queue_and_delivery(
    root: MTAService, config: Config, reactor, pools, worker_index: int, database
):
    """The queue store, its runner and control channel, and the delivery agents
    behind them: local delivery into the configured mail store, and the outbound
    relay with DKIM signing."""
    lanes = max(1, config.queue.io_lanes)
    spool_pool, delivery_pool = pools["spool"], pools["delivery"]
    # The outbound relay calls root.dkim.sign_job(job) just before sending; the
    # watcher pushes a changed [dkim] table to it.
    seal_as = config.hostname if config.checks.arc_seal else ""  # ARC-seal what we forward
    root.dkim = DKIMSigner(
        config.dkim, config.path("dkim"), pools["dkim"], reactor, seal_as=seal_as
    )
    ConfigWatcher(config, reactor, pools["db"], root.dkim).setServiceParent(root)

    store = open_queue_store(
        config,
        reactor,
        spool_pool,
        worker=worker_index,
        lanes=lanes,
    )
    # Quotas above every backend.  Usage is charged once per delivery batch on a
    # connection of its own without an fsync per commit (recomputable by
    # `user quota --recount`): with the shared one, that fsync cost 15% on 100 KB mail.
    usage = DatabaseHandle(database.path, migrate=auto_migrate(config), durable=False)
    _Closing(usage.close).setServiceParent(root)
    root.store = QuotaStore(open_store(config, reactor=reactor), usage)
    local = LocalDelivery(root.store, config.hostname, delivery_pool, reactor, lanes=lanes)
    relay = RelayDelivery(
        MXResolver(
            make_resolver(config.dns, reactor),
            reactor,
            port=config.relay.port,
            smarthost=config.relay.smarthost,
            unreachable_for=config.relay.unreachable_for,
        ),
        reactor,
        helo=config.relay.helo or config.hostname,
        tls=config.relay.tls,
        timeouts=Timeouts(
            command=config.relay.command_timeout,
            greeting=config.relay.command_timeout,
            data_done=config.relay.data_timeout,
        ),
        connect_timeout=config.relay.connect_timeout,
        destination_concurrency=config.relay.destination_concurrency,
        idle_timeout=config.relay.idle_timeout,
        signer=root.dkim,
        pool=delivery_pool,
    )
    relay.setServiceParent(root)
    agent = Router(
        config.local_domains,
        local,
        remote_agent=relay,
        quarantine_agent=QuarantineAgent(
            config.path("quarantine"), delivery_pool, reactor, keyring=_at_rest_keyring(config)
        ),
    )
    if service.IService.providedBy(store):  # the PostgreSQL queue: started before the runner
        store.setServiceParent(root)
        agent = store.recording_agent(agent)  # final results committed at once
    runner = QueueRunner(
        store,
        agent,
        reactor,
        retry_schedule=config.queue.retry_schedule,
        max_age=config.queue.max_age,
        concurrency=config.queue.delivery_concurrency,
        bouncer=Bouncer(store, config.hostname, reactor, spool_pool),
        delay_warning=config.queue.delay_warning,
    )
    if config.queue.backend == "local":
        # Takes the spool's owner lock before the runner recovers it (mta.queue.control).
        QueueControl(store, reactor, spool_pool).setServiceParent(root)
    runner.setServiceParent(root)
    root.spool, root.runner = store, runner
    root.queue_control = open_queue_control(config)
    return store, runner


def _listeners(
    root: MTAService,
    config: Config,
    reactor,
    spool,
    pipeline: PolicyPipeline,
    authenticator,
    tls,
    worker_index: int,
    inherited: dict[str, int] | None,
):
    """One listening service per `[[listener]]`, sharing the connection limits (and,
    with several workers, the balancer).  A worker process adopts the sockets it
    inherited instead of binding."""
    tracker = ConnectionTracker(config.limits.max_connections, config.limits.max_connections_per_ip)
    balancer = None
    if config.workers > 1:
        balancer = Balancer(config.datadir, config.workers, worker_index, reactor)
        tracker.on_change = balancer.set_load
        _BalancerService(balancer).setServiceParent(root)
    listeners = []
    for listener in config.listeners:
        context = SessionContext(
            config=config,
            listener=listener,
            spool=spool,
            pipeline=pipeline,
            clock=reactor,
            tls=tls if listener.tls != "none" else None,
            authenticator=authenticator if listener.auth != "none" else None,
        )
        fd = (inherited or {}).get(listener.name)
        if worker_index and fd is None:
            raise ValueError(
                f"worker {worker_index}: no inherited socket for listener {listener.name}"
            )
        service_ = ListenerService(
            listener,
            SMTPFactory(context, tracker),
            reactor,
            tls,
            inherited_fd=fd,
            shared=config.workers > 1,
            balancer=balancer,
            proxy_networks=config.limits.proxy_networks,
            proxy_timeout=config.limits.proxy_timeout,
        )
        service_.setServiceParent(root)
        listeners.append(service_)
    return tracker, listeners


def build_service(
    config: Config, reactor, *, worker_index: int = 0, inherited: dict[str, int] | None = None
) -> MTAService:
    """Build (but do not start) the service tree for `config`.

    `worker_index` 0 is the twistd process: it binds the listeners and, with
    `workers` > 1, supervises the other worker processes, which pass the sockets
    they inherited as `inherited` (listener name -> file descriptor).
    """
    root = MTAService(config, reactor)
    os.makedirs(config.datadir, mode=0o750, exist_ok=True)
    if worker_index == 0:
        adopt_orphaned_queues(config)
    pools = _thread_pools(root, config)
    db_pool, auth_pool = pools["db"], pools["auth"]
    location = database_location(config)
    database = DatabaseHandle(location, migrate=auto_migrate(config))
    _Closing(database.close).setServiceParent(root)  # stops after every user of it
    root.database = database

    directory = UserDirectory(config, location, reactor, db_pool)
    directory.setServiceParent(root)
    spool, runner = _queue_and_delivery(root, config, reactor, pools, worker_index, database)

    tls = None
    if any(lst.tls != "none" for lst in config.listeners):
        tls = server_context(
            config.tls.certificate, config.tls.key, config.datadir, config.hostname
        )
    authenticator, sender_policy = _submission(config, reactor, root, database, db_pool, auth_pool)
    buckets = None
    if is_postgres(location):  # several nodes: the rate limits count in the database
        run_db = partial(threads.deferToThreadPool, reactor, db_pool)
        buckets = RateBuckets(database, run_db, reactor)
        buckets.setServiceParent(root)
    pipeline = policy_pipeline(
        config, reactor, directory, sender_policy, pools["checks"], pools["sender-auth"], buckets
    )
    tracker, listeners = _listeners(
        root, config, reactor, spool, pipeline, authenticator, tls, worker_index, inherited
    )
    if worker_index == 0 and config.workers > 1:
        WorkerSupervisor(config, listeners, reactor, config.workers).setServiceParent(root)

    root.directory, root.tracker, root.tls = directory, tracker, tls
    if worker_index == 0:
        add_operations(root, config, reactor)
    return root


def add_operations(root: MTAService, config: Config, reactor, registry=None) -> None:
    """Metrics, /healthz /readyz on `[http]` and the `[manhole]` SSH console, added
    last (so they stop first).  Only worker 0 calls this: with `workers` > 1 the
    metrics and the console describe that process only."""
    from prometheus_client import CollectorRegistry

    from mta.db import Database
    from mta.observe.health import Health, service_checks, service_probes
    from mta.observe.http import HTTPService, make_site
    from mta.observe.metrics import MetricsService, summary

    registry = CollectorRegistry() if registry is None else registry
    root.registry = registry
    pool = _pool("observe", 2)
    ThreadPoolService(pool).setServiceParent(root)
    metrics = MetricsService(root, registry)
    metrics.setServiceParent(root)
    root.metrics = metrics.metrics
    root.http = root.manhole = None

    location = database_location(config)
    if config.http.address:
        host, _, port = config.http.address.rpartition(":")
        probes = service_probes(root, database=location)
        if is_postgres(location) and getattr(root, "database", None) is not None:
            probes["database"] = lambda: root.database().ping()  # a query on PostgreSQL
        health = Health(reactor, pool, probes=probes, checks=service_checks(root))
        root.http = HTTPService(
            host.strip("[]") or "0.0.0.0", int(port), make_site(registry, health), reactor, health
        )
        root.http.setServiceParent(root)

    if config.manhole.address:
        from twisted.internet.threads import deferToThreadPool

        from mta.admin.manhole import ManholeService, make_factory, make_namespace

        def record_login(username: str, client: str, fingerprint: str):
            def write() -> None:
                with Database(location, migrate=auto_migrate(config)) as db:
                    db.record_audit(
                        "manhole.login",
                        username,
                        ip_address=client,
                        user_agent="manhole",
                        details={"key": fingerprint},
                    )

            return deferToThreadPool(reactor, pool, write)

        namespace = make_namespace(root, registry, reactor, lambda: summary(registry))
        factory = make_factory(
            namespace,
            config.manhole.authorized_keys,
            config.path("manhole", "ssh_host_key"),
            record_login,
            reactor,
        )
        host, _, port = config.manhole.address.rpartition(":")
        root.manhole = ManholeService(host.strip("[]"), int(port), factory, reactor)
        root.manhole.setServiceParent(root)
