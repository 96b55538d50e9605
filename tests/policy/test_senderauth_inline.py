"""Sender authentication on the reactor: a small message held in memory whose DNS
answers are all cached is checked without a hop to the thread pool, with exactly the
verdict the pool gives; everything else (a cache miss, a spilled or large message,
one with many signatures) still goes to the pool."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from mta.policy.authdns import NotCached
from mta.policy.senderauth import INLINE_SIZE, SenderAuthCheck
from mta.policy.verdict import Phase, Verdict
from mta.testing import MemoryBody
from tests.policy.authzone import HOSTNAME, auth_zones, in_thread, message  # noqa: F401
from tests.policy.test_authresults import context


class CountingPool:
    """The reactor's pool, counting what is run on it."""

    def __init__(self):
        self.calls = []
        self.pool = reactor.getThreadPool()

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        self.calls.append(getattr(f, "__name__", repr(f)))
        self.pool.callInThreadWithCallback(on_result, f, *args, **kw)


def make(zones, **kw):
    pool = CountingPool()
    kw.setdefault("spf", "enforce")
    kw.setdefault("dkim", "enforce")
    kw.setdefault("dmarc", "enforce")
    return SenderAuthCheck(zones.dns(), reactor, pool, HOSTNAME, **kw), pool


async def run(check, phase, ctx):
    v = check.check(phase, ctx)
    return (v, True) if isinstance(v, Verdict) else (await v, False)


async def transaction(check, sender, data, *, in_memory, session="S1"):
    ctx = context(sender, session_id=session)
    mail, mail_inline = await run(check, Phase.MAIL, ctx)
    if mail.refuses:
        return (mail, None), (mail_inline, None)
    body = MemoryBody(data, in_memory=in_memory)
    ctx = ctx._replace(queue_id="Q", body=body, size=len(data))
    end, end_inline = await run(check, Phase.DATA, ctx)
    return (mail, end), (mail_inline, end_inline)


def same(a: Verdict | None, b: Verdict | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.action, a.reply, a.headers, a.remove) == (b.action, b.reply, b.headers, b.remove)


SCENARIOS = [
    ("alice@example.test", "rsa", "Alice <alice@example.test>"),  # all pass
    ("alice@example.test", None, "Alice <alice@example.test>"),  # unsigned: DMARC by SPF
    ("alice@fail.test", None, "a@fail.test"),  # SPF fail, p=reject: 550
    ("alice@soft.test", None, "a@soft.test"),  # softfail, p=quarantine
    ("alice@example.test", "ed", '"Doe, A" <a@example.test>, b@soft.test'),
]


@pytest.mark.parametrize("sender, key, from_field", SCENARIOS)
@pytest_twisted.ensureDeferred
async def test_inline_gives_the_verdict_the_pool_gives(auth_zones, sender, key, from_field):  # noqa: F811
    data = message(from_field)
    if key:
        data = auth_zones.keys[key].sign(data)
    check, pool = make(auth_zones)
    pooled, how = await transaction(check, sender, data, in_memory=True, session="S1")
    assert how == (False, False) or how == (False, None)  # the cache was cold
    assert pool.calls
    pool.calls.clear()
    inline, how = await transaction(check, sender, data, in_memory=True, session="S2")
    assert how in ((True, True), (True, None))
    assert pool.calls == []
    assert same(pooled[0], inline[0]) and same(pooled[1], inline[1])
    # and a body that is not in memory still goes to the pool, with the same answer
    threaded, how = await transaction(check, sender, data, in_memory=False, session="S3")
    assert how[1] in (False, None) and pool.calls
    assert same(threaded[0], inline[0]) and same(threaded[1], inline[1])


@pytest_twisted.ensureDeferred
async def test_a_cache_miss_goes_to_the_pool(auth_zones):  # noqa: F811
    check, pool = make(auth_zones)
    data = auth_zones.keys["rsa"].sign(message())
    await transaction(check, "alice@example.test", data, in_memory=True, session="S1")
    check.dns._answers.clear()  # everything expired
    check._spf_verdicts.clear()  # (as did the SPF verdict resting on those answers)
    pool.calls.clear()
    (mail, end), how = await transaction(check, "alice@example.test", data, in_memory=True)
    assert how == (False, False)
    assert pool.calls == ["_spf_fresh", "_authenticate"]
    assert "dkim=pass" in b"".join(end.headers).decode()


@pytest.mark.parametrize("why", ["large", "signatures"])
@pytest_twisted.ensureDeferred
async def test_large_or_much_signed_messages_go_to_the_pool(auth_zones, why):  # noqa: F811
    check, pool = make(auth_zones)
    if why == "large":
        data = message(extra=b"") + b"x" * 78 + b"\r\n"
        data = data + (b"y" * 998 + b"\r\n") * (INLINE_SIZE // 1000 + 1)
        data = auth_zones.keys["rsa"].sign(data)
    else:
        data = message()
        for _ in range(4):
            data = auth_zones.keys["rsa"].sign(data)
    await transaction(check, "alice@example.test", data, in_memory=True, session="S1")
    pool.calls.clear()
    (mail, end), how = await transaction(check, "alice@example.test", data, in_memory=True)
    assert how == (True, False)  # MAIL inline (cached SPF); the message on the pool
    assert pool.calls == ["_authenticate"]
    assert "dkim=pass" in b"".join(end.headers).decode()


@pytest_twisted.ensureDeferred
async def test_run_cached_sees_a_swallowed_miss(auth_zones):  # noqa: F811
    dns = auth_zones.dns()

    def swallowing():
        try:
            dns.txt("_dmarc.example.test")
        except BaseException:  # what pyspf's bare excepts do
            return "wrong"
        return "right"

    assert dns.run_cached(swallowing) == (False, None)
    assert await in_thread(dns.txt, "_dmarc.example.test")  # now cached
    assert dns.run_cached(swallowing) == (True, "right")

    def raising():
        dns.txt("not-cached.example.test")
        return "asked the DNS"

    assert dns.run_cached(raising) == (False, None)
    with pytest.raises(NotCached):  # what `raising` met: not an Exception
        dns._local.cached_only = True
        try:
            raising()
        finally:
            dns._local.cached_only = False


@pytest_twisted.ensureDeferred
async def test_an_spf_verdict_is_reused_while_its_dns_answers_are_valid(auth_zones, monkeypatch):  # noqa: F811
    """The same client, sender and HELO get the verdict pyspf gave, without pyspf,
    until the first DNS answer it rested on expires; another sender or HELO is
    evaluated; a temperror is never reused."""
    import mta.policy.senderauth as senderauth

    evaluated = []
    real = senderauth.check_spf

    def counting(dns, ip, sender, helo, **kw):
        evaluated.append((sender, helo))
        return real(dns, ip, sender, helo, **kw)

    monkeypatch.setattr(senderauth, "check_spf", counting)
    check, pool = make(auth_zones)
    data = auth_zones.keys["rsa"].sign(message())
    first, _ = await transaction(check, "alice@example.test", data, in_memory=True, session="S1")
    assert set(evaluated) == {("alice@example.test", "client.helo.test")}  # (cold: twice)
    evaluated.clear()
    again, how = await transaction(check, "alice@example.test", data, in_memory=True, session="S2")
    assert evaluated == []
    assert how == (True, True) and same(first[0], again[0]) and same(first[1], again[1])
    await transaction(check, "bob@example.test", data, in_memory=True, session="S3")
    assert evaluated == [("bob@example.test", "client.helo.test")]
    [(until, result)] = [v for k, v in check._spf_verdicts.items() if k[1] == "alice@example.test"]
    assert result.result == "pass" and until > check.dns.now()
    check._spf_verdicts[next(iter(check._spf_verdicts))] = (check.dns.now() - 1, result)
    await transaction(check, "alice@example.test", data, in_memory=True, session="S4")
    assert len(evaluated) == 2  # expired: evaluated again
    for session in ("S5", "S6"):  # SERVFAIL under temp.test's include: 451, each time anew
        (mail, _), _ = await transaction(
            check, "a@temp.test", data, in_memory=True, session=session
        )
        assert mail.reply.code == 451
    assert len(evaluated) >= 4  # each time anew (after a first try from the cache)
    assert not any(key[1] == "a@temp.test" for key in check._spf_verdicts)
