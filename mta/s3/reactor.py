"""Where the S3 store's blocking methods meet the reactor that does its HTTP.

`IMailStore` methods block: the server calls them in a thread of its delivery or
health pool while its reactor runs in the main thread; `ReactorCaller` runs a
coroutine there (`blockingCallFromThread`) and waits for its result.  Called on
the reactor's own thread it refuses (it would wait for itself forever).

`mta-admin` (and a test that calls the store from plain code) has no running
reactor: `ReactorThread` runs a reactor of its own in a daemon thread.  It is a
separate instance, never installed as the global reactor, and does not register
its thread as Twisted's I/O thread, so it cannot disturb a global reactor.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.python import threadable

__all__ = ["ReactorCaller", "ReactorThread"]


class ReactorCaller:
    """Calls coroutine functions on `reactor` (running in another thread) and
    blocks the calling thread until they finish."""

    def __init__(self, reactor, *, thread: threading.Thread | None = None):
        self.reactor = reactor
        self._thread = thread

    def on_reactor_thread(self) -> bool:
        if self._thread is not None:
            return threading.current_thread() is self._thread
        return bool(threadable.isInIOThread())

    def __call__(self, f: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        if self.on_reactor_thread():
            raise RuntimeError("the S3 store blocks: call it from a thread, not the reactor")
        return blockingCallFromThread(self.reactor, lambda: defer.ensureDeferred(f(*args)))

    def submit(self, f: Callable[..., Awaitable[Any]], *args: Any) -> futures.Future:
        """Start `f(*args)` on the reactor and return at once: a Future of its result."""
        if self.on_reactor_thread():
            raise RuntimeError("the S3 store blocks: call it from a thread, not the reactor")
        future: futures.Future = futures.Future()

        def start() -> None:
            d = defer.ensureDeferred(f(*args))
            d.addCallbacks(future.set_result, lambda failure: future.set_exception(failure.value))

        self.reactor.callFromThread(start)
        return future


def _new_reactor():
    try:
        from twisted.internet.epollreactor import EPollReactor as reactor_class
    except ImportError:  # not Linux
        from twisted.internet.selectreactor import SelectReactor as reactor_class
    reactor = reactor_class()
    reactor._registerAsIOThread = False
    return reactor


class ReactorThread:
    """A private reactor running in a daemon thread until `stop`."""

    def __init__(self):
        self.reactor = _new_reactor()
        self.thread = threading.Thread(
            target=self.reactor.run,
            kwargs={"installSignalHandlers": False},
            name="mta-s3-reactor",
            daemon=True,
        )
        self.thread.start()
        self.call = ReactorCaller(self.reactor, thread=self.thread)

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(timeout)
