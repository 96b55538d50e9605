"""mta.process.threads.WorkThreads: results come back through deferToThreadPool, in
order on one thread, errors as failures, and stop waits for queued calls."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThreadPool

from mta.process.threads import WorkThreads


@pytest.fixture
def threads():
    pool = WorkThreads("test-work", 1)
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.inlineCallbacks
def test_results_and_errors_come_back_to_the_reactor(threads):
    names = []

    def work(x):
        names.append(threading.current_thread().name)
        return x * 2

    assert (yield deferToThreadPool(reactor, threads, work, 21)) == 42
    assert names == ["test-work-0"]
    with pytest.raises(ZeroDivisionError):
        yield deferToThreadPool(reactor, threads, lambda: 1 / 0)
    # The thread survived the error.
    assert (yield deferToThreadPool(reactor, threads, work, 1)) == 2


def test_one_thread_runs_calls_in_order_and_stop_drains_them():
    pool = WorkThreads("test-order", 1)
    seen = []
    release = threading.Event()
    pool.callInThread(release.wait)
    for i in range(100):
        pool.callInThreadWithCallback(lambda ok, r: seen.append((ok, r)), lambda i=i: i)
    pool.start()  # calls made before start wait for it
    release.set()
    pool.stop()
    assert seen == [(True, i) for i in range(100)]
    assert not pool.started


def test_a_failing_result_callback_does_not_kill_the_thread():
    pool = WorkThreads("test-cb", 1)
    pool.start()
    done = threading.Event()

    def bad_callback(ok, result):
        raise RuntimeError("callback bug")

    pool.callInThreadWithCallback(bad_callback, lambda: None)
    pool.callInThreadWithCallback(lambda ok, r: done.set(), lambda: None)
    assert done.wait(5)
    pool.stop()
