"""Webhook delivery end to end in one process: the fan-out and delivery loops of
workers/webhooks.py on a real Redis, POSTing to real HTTP receivers on loopback that verify
every delivery with the ``standardwebhooks`` package. Retry times are driven by an injected
clock (never real waits of minutes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from broker.sessions.models import now_ms
from broker.webhooks.queue import RETRY_SCHEDULE_S
from tenants.crypto import CredentialCipher, generate_secret_key
from tenants.scope import WEBHOOK_PENDING, TenantScope
from workers.metrics import WorkerMetrics
from workers.webhooks import WebhookDelivery

from .helpers import create_endpoint, session_event
from .receiver import Receiver

TID = "ten_wh"
DAY_MS = 86400 * 1000


class Clock:
    """The wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self) -> int:
        return now_ms() + self.offset

    def advance(self, ms: int) -> None:
        self.offset += ms


@pytest.fixture
def cipher() -> CredentialCipher:
    return CredentialCipher([generate_secret_key()])


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def start(redis: aioredis.Redis, cipher: CredentialCipher) -> AsyncIterator[Callable[..., Awaitable[WebhookDelivery]]]:
    made: list[WebhookDelivery] = []

    async def make(**kw: Any) -> WebhookDelivery:
        kw.setdefault("allow_private", True)
        kw.setdefault("rand", lambda: 0.5)  # no jitter: the schedule exactly
        d = WebhookDelivery(redis, cipher, WorkerMetrics(), sweep_s=0.2, **kw).start()
        made.append(d)
        assert await d.wait_subscribed()
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.stop()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def attempts(redis: aioredis.Redis, weid: str) -> list[dict[str, str]]:
    rows = await redis.xrange(TenantScope(TID).webhook_attempts(weid))
    return [{k.decode(): v.decode() for k, v in raw.items()} for _, raw in rows]


async def test_per_session_order_holds_when_first_attempts_fail(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()
    failed_once: set[str] = set()

    def rule(rec: Any, nth: int) -> tuple[int, float, dict[str, str]]:
        # the first attempt of every session.ready, and of the created event of sessions 0 and 3, fails
        t, sid = rec.event["type"], rec.event["data"]["session"]["id"]
        if nth == 1 and (t == "session.ready" or (t == "session.created" and sid in ("sess_0", "sess_3"))):
            failed_once.add(rec.webhook_id)
            return 500, 0.0, {}
        return 200, 0.0, {}

    weid, secret = await create_endpoint(redis, cipher, TID, receiver.expect("a", rule=None))
    receiver.expect("a", secret, rule=rule)
    await start(clock=clock)
    expected: dict[str, list[str]] = {}
    for i in range(6):
        sid = f"sess_{i}"
        for etype, status in (("session.created", "queued"), ("session.ready", "ready"),
                              ("session.terminated", "terminated")):
            expected.setdefault(sid, []).append("evt_" + await session_event(redis, TID, sid, etype, status))

    async def all_delivered() -> bool:
        if len(receiver.of("a")) >= 18:
            return True
        clock.advance(6_000)  # past the 5 s retry (+10 %) of whatever failed
        return False

    await until(all_delivered, 20, "18 deliveries")
    assert not receiver.unverified
    assert len(failed_once) == 8
    for sid, ids in expected.items():
        got = [r for r in receiver.received if r.event["data"]["session"]["id"] == sid]
        # every POST of the session, failed ones included, in event order: event k+1 is never
        # sent before event k was delivered (2xx)
        order = [r.webhook_id for r in got]
        assert order == sorted(order, key=ids.index), (sid, order)
        assert [r.webhook_id for r in got if r.status == 200] == ids
        assert [r.event["data"]["sequence"] for r in got if r.status == 200] == [1, 2, 3]
    await until(lambda: _pending_is(redis, 0), what="every delivery recorded")


async def _pending_is(redis: aioredis.Redis, n: int) -> bool:
    return int(await redis.get(WEBHOOK_PENDING) or 0) == n


async def test_retry_schedule_retry_after_and_give_up(
        redis: aioredis.Redis, cipher: CredentialCipher, receiver: Receiver, start: Any) -> None:
    clock = Clock()

    def rule(rec: Any, nth: int) -> tuple[int, float, dict[str, str]]:
        return (503, 0.0, {"Retry-After": "120"}) if nth == 1 else (500, 0.0, {})

    weid, secret = await create_endpoint(redis, cipher, TID, receiver.expect("r"))
    receiver.expect("r", secret, rule=rule)
    d = await start(clock=clock)
    await session_event(redis, TID, "sess_r", "session.created")
    due_key = TenantScope(TID).webhook_due(weid)
    for n in range(1, len(RETRY_SCHEDULE_S) + 1):
        # the attempt-log line is written by the same Lua step that reschedules
        await until(lambda: _logged(redis, weid, n), what=f"attempt {n} recorded")  # noqa: B023
        log = await attempts(redis, weid)
        assert log[-1]["attempt"] == str(n) and log[-1]["status"] in ("500", "503")
        at = int(log[-1]["at"])
        score = int(await redis.zscore(due_key, "sess_r"))
        # the first failure said Retry-After: 120 (later than the 5 s of the schedule)
        wanted = 120_000 if n == 1 else RETRY_SCHEDULE_S[n - 1] * 1000
        assert score - at == wanted, (n, score - at, wanted)
        assert len(receiver.of("r", None)) == n  # not tried again before its time
        clock.offset = score - now_ms() + 1  # the retry time has come
        d.poke()
    # the 10th attempt (after the 9th retry) fails: given up, the queue is empty
    await until(lambda: _logged(redis, weid, 10), what="attempt 10 recorded")
    assert await redis.zcard(due_key) == 0
    assert int(await redis.get(WEBHOOK_PENDING)) == 0
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total", {"outcome": "gave_up"}) == 1
    assert d.metrics.registry.get_sample_value("broker_webhook_deliveries_total", {"outcome": "retry"}) == 9
    # same webhook-id on every attempt; every one verified
    assert len({r.webhook_id for r in receiver.received}) == 1 and not receiver.unverified
    ep = await redis.hgetall(TenantScope(TID).webhook_endpoint(weid))
    assert ep[b"disabled"] == b"0" and ep[b"failing_since"] != b""  # 3.1 days of retries: not 5 days yet


async def _logged(redis: aioredis.Redis, weid: str, n: int) -> bool:
    return await redis.xlen(TenantScope(TID).webhook_attempts(weid)) >= n
