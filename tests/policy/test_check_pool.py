"""The end-of-DATA checks do their blocking work (reading the message for clamd and
spamd, parsing MIME and zips) on the pool the composition root gives them, never on
the reactor's default thread pool, which everything else shares."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool

from mta.config import build_config
from mta.policy.attachments import AttachmentCheck
from mta.policy.clamd import VirusCheck
from mta.policy.compose import policy_pipeline
from mta.policy.spamd import SpamCheck
from mta.policy.verdict import Action, Phase, PolicyContext
from mta.testing import FakeDirectory, FakeSenderPolicy, MemoryBody
from tests.policy.conftest import GTUBE, MARKER

MESSAGE = (
    b"From: a@remote.test\r\nTo: b@example.test\r\nSubject: files\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
    b"--XX\r\nContent-Type: text/plain\r\n\r\n" + GTUBE + b"\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Disposition: attachment; filename="tool.exe"\r\n\r\n' + MARKER + b"\r\n--XX--\r\n"
)


class CountingPool(ThreadPool):
    """A bounded ThreadPool that counts the calls it is given."""

    def __init__(self):
        super().__init__(0, 2, name="test-checks")
        self.calls = 0

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        self.calls += 1
        return super().callInThreadWithCallback(onResult, func, *args, **kw)


@pytest.fixture
def pool():
    pool = CountingPool()
    pool.start()
    yield pool
    pool.stop()


@pytest.fixture
def no_default_pool(monkeypatch):
    """The reactor's shared pool is out of bounds while the checks run."""
    from twisted.internet import reactor

    def refuse():
        raise AssertionError("a check used the reactor's default thread pool")

    monkeypatch.setattr(reactor, "getThreadPool", refuse)
    return reactor


@pytest_twisted.ensureDeferred
async def test_every_scan_runs_on_the_given_pool(spamd_server, clamd_server, pool, no_default_pool):
    reactor = no_default_pool
    config = build_config(
        {
            "checks": {
                "spamd": spamd_server.address,
                "clamd": clamd_server.address,
                "spam_action": "reject",
                "blocked_attachments": ["exe"],
            }
        }
    )
    pipeline = policy_pipeline(config, reactor, FakeDirectory({}), FakeSenderPolicy({}), pool)
    scans = (VirusCheck, SpamCheck, AttachmentCheck)
    virus, spam, attachments = [c for c in pipeline.checks_for(Phase.DATA) if isinstance(c, scans)]
    assert isinstance(virus, VirusCheck) and isinstance(spam, SpamCheck)
    assert isinstance(attachments, AttachmentCheck)
    context = PolicyContext(
        "192.0.2.1", "smtp", queue_id="Q1", body=MemoryBody(MESSAGE), size=len(MESSAGE)
    )
    for check, expected in ((virus, "virus"), (spam, "spam"), (attachments, "tool.exe")):
        before = pool.calls
        verdict = await check.check(Phase.DATA, context)
        assert verdict.action is Action.REJECT
        assert expected in (verdict.reason or "") + verdict.reply.text
        assert pool.calls > before, f"{check.name} did not use the checks' pool"
