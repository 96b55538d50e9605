"""Recipient resolution for the SMTP session: which local mailboxes an address means.

The session asks at RCPT time, so the answer must be fast and must never block the
reactor.  `UserDirectory` keeps an in-memory snapshot of enabled users and aliases
(loaded in a thread pool) and answers hits synchronously from it.  A miss is asked
again of the database in the thread pool, so a user created by `mta-admin` a moment
ago is accepted at once; a removed user disappears when the snapshot is refreshed,
which happens at most once per `refresh_interval`, and only when the file changed.

The rules themselves are the pure function `expand`, run against either the
snapshot or the database:

- `postmaster@<local domain>` and `<postmaster>` always go to `config.postmaster`
  (RFC 5321 4.5.1), whatever the tables say.
- An alias wins over a user of the same name (Postfix's virtual_alias_maps
  semantics); an alias may name its own source to keep a copy (`a -> a, b`).
- Aliases chain up to `MAX_DEPTH` levels; a loop ends at the first repeated
  address, which delivers only if it is a user.  Remote targets are returned as is;
  local targets that are neither user nor alias are dropped (and logged).
- Anything else in a local domain that is not an enabled user resolves to `()`,
  which the session turns into 550 5.1.1.

`quota_usage` serves the quota check (`mta.policy.quota`) the same way: quotas come
with the snapshot, so a server where nobody has one answers from memory; the usage
of a mailbox with a quota is read in the thread pool and kept until the refresh tick
sees the file change (deliveries commit on another connection, so it does).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from zope.interface import implementer

from mta.config import Config
from mta.db import Database, Snapshot, address_key, auto_migrate, fold, mailbox_address
from mta.envelope import Address, AddressError, parse_mailbox
from mta.interfaces import IUserDirectory
from mta.observe.logging import Logger

log = Logger()

MAX_DEPTH = 10
# Bound on addresses visited per resolution, so a wide alias fan-out stays cheap.
MAX_EXPANSION = 1000
_MAX_ANSWERS = 10000


def expand(
    address: Address,
    *,
    is_user: Callable[[str], bool],
    targets_of: Callable[[str], tuple[str, ...]],
    local_domains: Collection[str],
    postmaster: Address,
    max_depth: int = MAX_DEPTH,
) -> tuple[Address, ...]:
    """The mailboxes `address` delivers to, in order, without duplicates.

    `is_user(key)` says whether `key` (see `mta.db.address_key`) is an enabled user;
    `targets_of(key)` gives the stored alias targets of `key`, or `()`.  Local parts
    are compared folded (NFC, lower-case: `mta.db.fold`), so every spelling of a
    UTF-8 mailbox reaches it, and the mailboxes returned are in that form.
    """
    domain = address.domain.lower()
    local = fold(address.local)
    if local == "postmaster" and (not domain or domain in local_domains):
        return (postmaster,)
    if domain not in local_domains:
        return ()
    out: dict[Address, None] = {}
    budget = [MAX_EXPANSION]

    def visit(addr: Address, depth: int, chain: frozenset[str]) -> None:
        if budget[0] <= 0:
            return
        budget[0] -= 1
        if addr.domain.lower() not in local_domains:
            out.setdefault(addr)
            return
        key = address_key(addr)
        if fold(addr.local) == "postmaster":
            out.setdefault(postmaster)
            return
        targets = () if key in chain else targets_of(key)
        if targets:
            if depth >= max_depth:
                log.warn(
                    "alias chain too deep at {key}, started at {start}", key=key, start=str(address)
                )
                return
            for text in targets:
                target = _parse_target(text, key)
                if target is not None:
                    visit(target, depth + 1, chain | {key})
        elif is_user(key):
            mailbox = Address(fold(addr.local), addr.domain.lower())
            out.setdefault(mailbox)
        elif key in chain:
            log.warn("alias loop at {key}, started at {start}", key=key, start=str(address))
        elif depth:
            log.warn("alias target {key} is neither a user nor an alias", key=key)

    visit(Address(local, domain), 0, frozenset())
    return tuple(out)


def _parse_target(text: str, source: str) -> Address | None:
    try:
        return parse_mailbox(text, utf8=True)
    except AddressError as e:
        log.warn(
            "alias {source} has an invalid target {target}: {error}",
            source=source,
            target=text,
            error=str(e),
        )
        return None


@implementer(IUserDirectory)
class UserDirectory(service.Service):
    """`IUserDirectory` over `mta.db`, as a service.

    `startService` (or `start()`, which returns a Deferred the composition root can
    wait on) opens the database in the thread pool, creates the postmaster mailbox
    user when missing and loads the snapshot; `stopService` stops the refresh loop
    and closes the database.  The thread pool belongs to the caller, which must stop
    it only after this service has stopped.  `run_in_thread(f, *args)` -> Deferred
    replaces the thread pool in tests (e.g. with `defer.maybeDeferred`).
    """

    name = "directory"

    def __init__(
        self,
        config: Config,
        db_path: str,
        reactor: Any,
        threadpool: Any,
        *,
        refresh_interval: float = 1.0,
        run_in_thread: Callable[..., defer.Deferred] | None = None,
    ):
        self._db_path = db_path  # an SQLite path or a postgresql:// dsn (mta.db.location)
        self._migrate = auto_migrate(config)
        self._reactor = reactor
        self._threadpool = threadpool
        self._local_domains = frozenset(config.local_domains)
        self._postmaster = mailbox_address(config.postmaster)
        self._refresh_interval = refresh_interval
        if run_in_thread is None:

            def run_in_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred:
                return threads.deferToThreadPool(reactor, threadpool, f, *args)

        self._run = run_in_thread
        self._db: Database | None = None
        self._snapshot: Snapshot | None = None
        # Answers computed from the current snapshot (dropped with it): the same few
        # recipients arrive again and again, and expanding costs microseconds each.
        self._answers: dict[Address, tuple[Address, ...]] = {}
        # used_bytes of mailboxes with a quota, as of `_data_version` (dropped with it).
        self._usage: dict[str, int] = {}
        self._data_version: int | None = None
        self._loop: task.LoopingCall | None = None
        self._starting: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []
        self._refreshing: defer.Deferred | None = None
        self._stopped = False

    # -- lifecycle -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.start().addErrback(
            lambda f: log.failure("user directory failed to start: {db}", f, db=self._db_path)
        )

    def start(self) -> defer.Deferred:
        """Load the directory; the Deferred fires (with None) once it can answer."""
        done: defer.Deferred = defer.Deferred()
        if self._snapshot is not None:
            done.callback(None)
            return done
        self._waiting.append(done)
        if self._starting is None:
            self._starting = self._run(self._open)
            self._starting.addCallbacks(self._opened, self._failed)
        return done

    def _open(self) -> tuple[Database, int, Snapshot]:
        """In the thread pool: open (and migrate) the file, ensure the postmaster."""
        db = Database(self._db_path, migrate=self._migrate)
        try:
            postmaster = address_key(self._postmaster)
            with db.transaction():
                if db.ensure_user(postmaster):
                    db.record_audit(
                        "user.add",
                        postmaster,
                        user_agent="mta",
                        details={"reason": "configured postmaster did not exist"},
                    )
            # data_version first: a commit between the two only causes a spare reload.
            version = db.data_version()
            return db, version, db.snapshot()
        except BaseException:
            db.close()
            raise

    def _opened(self, result: tuple[Database, int, Snapshot]) -> None:
        db, version, snapshot = result
        self._db = db
        self._apply(version, snapshot)
        log.info(
            "user directory loaded: {users} users, {aliases} aliases",
            users=len(snapshot.users),
            aliases=len(snapshot.aliases),
        )
        if self._stopped:  # stopService came while we were loading
            self._close()
        elif self.running:
            self._loop = task.LoopingCall(self._refresh)
            self._loop.clock = self._reactor
            self._loop.start(self._refresh_interval, now=False).addErrback(
                lambda f: log.failure("user directory refresh loop died", f)
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _failed(self, failure: Any) -> None:
        self._starting = None  # a later start() may try again
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopped = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._refreshing is None:
            return defer.maybeDeferred(self._close)
        # Let the tick in flight finish with the connection before closing it.
        finished: defer.Deferred = defer.Deferred()

        def release(result: Any) -> Any:
            finished.callback(None)
            return result

        self._refreshing.addBoth(release)
        return finished.addCallback(lambda _: self._close())

    def _close(self) -> defer.Deferred | None:
        db, self._db = self._db, None
        if db is None:
            return None
        if self._threadpool is not None and not getattr(self._threadpool, "started", True):
            db.close()  # the pool is gone; closing inline beats never closing
            return None
        return self._run(db.close)

    # -- refresh -------------------------------------------------------------

    def _refresh(self) -> defer.Deferred | None:
        """One tick: reload the snapshot if users or aliases changed on disk."""
        if self._db is None or self._snapshot is None:
            return None
        d = self._run(self._changes, self._db, self._data_version, self._snapshot.generation)

        def changed(result: tuple[int, Snapshot | None] | None) -> None:
            if result is not None:
                self._apply(*result)

        d.addCallback(changed)
        d.addErrback(lambda f: log.failure("user directory refresh failed", f))

        def done(result: Any) -> Any:
            self._refreshing = None
            return result

        self._refreshing = d.addBoth(done)
        return d

    @staticmethod
    def _changes(
        db: Database, version: int | None, generation: int
    ) -> tuple[int, Snapshot | None] | None:
        """In the thread pool.  data_version is free to read; the generation counter
        skips reloads caused by audit rows and last_login updates."""
        new_version = db.data_version()
        if new_version == version:
            return None
        if db.directory_generation() == generation:
            return new_version, None
        return new_version, db.snapshot()

    def _apply(self, version: int, snapshot: Snapshot | None) -> None:
        self._data_version = version
        self._usage = {}  # the file changed: any usage may have
        if snapshot is not None:
            if self._snapshot is not None:
                log.info(
                    "user directory reloaded (generation {generation})",
                    generation=snapshot.generation,
                )
            self._snapshot = snapshot
            self._answers = {}

    # -- IUserDirectory ------------------------------------------------------

    def resolve(self, address: Address) -> tuple[Address, ...] | defer.Deferred:
        """A tuple when the snapshot answers; a Deferred when the database must."""
        snapshot = self._snapshot
        if snapshot is None:
            if self._starting is None:
                return defer.fail(RuntimeError("user directory is not started"))
            return self.start().addCallback(lambda _: self.resolve(address))
        answers = self._answers
        result = answers.get(address)
        if result is None:
            result = expand(
                address,
                is_user=snapshot.users.__contains__,
                targets_of=lambda key: snapshot.aliases.get(key, ()),
                local_domains=self._local_domains,
                postmaster=self._postmaster,
            )
            if result:
                if len(answers) >= _MAX_ANSWERS:
                    answers.clear()
                answers[address] = result
        if result or address.domain.lower() not in self._local_domains or self._db is None:
            return result
        return self._run(self._resolve_from_db, self._db, address)

    def _resolve_from_db(self, db: Database, address: Address) -> tuple[Address, ...]:
        return expand(
            address,
            is_user=db.is_enabled_user,
            targets_of=db.alias_targets,
            local_domains=self._local_domains,
            postmaster=self._postmaster,
        )

    # -- quotas --------------------------------------------------------------

    def quota_usage(self, mailboxes) -> dict | defer.Deferred:
        """`{mailbox: (quota, used)}` in bytes for those of `mailboxes` with a quota:
        a dict when memory answers, else a Deferred firing with it.  The usage may
        be up to `refresh_interval` old; delivery enforces the quota exactly."""
        snapshot = self._snapshot
        if snapshot is None:
            if self._starting is None:
                return defer.fail(RuntimeError("user directory is not started"))
            return self.start().addCallback(lambda _: self.quota_usage(mailboxes))
        quotas = snapshot.quotas
        if not quotas:
            return {}
        limited = {}
        for mailbox in mailboxes:
            key = address_key(mailbox)
            quota = quotas.get(key)
            if quota is not None:
                limited[mailbox] = (key, quota)
        if not limited:
            return {}
        usage = self._usage
        missing = [key for key, _ in limited.values() if key not in usage]
        if not missing or self._db is None:
            return {m: (quota, usage.get(key, 0)) for m, (key, quota) in limited.items()}

        known = {key: usage[key] for key, _ in limited.values() if key in usage}

        def read(found: dict[str, tuple[int | None, int]]) -> dict:
            fresh = {key: found.get(key, (None, 0))[1] for key in missing}
            if self._usage is usage:  # not invalidated while we read
                if len(usage) >= _MAX_ANSWERS:
                    usage.clear()
                usage.update(fresh)
            known.update(fresh)
            return {m: (quota, known[key]) for m, (key, quota) in limited.items()}

        return self._run(self._db.quota_usage, missing).addCallback(read)
