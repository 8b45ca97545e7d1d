"""A worker process SIGKILLed while one of its webhook POSTs is in flight (the receiver holds
the request): another worker process delivers it when the claim's lease runs out."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis as sync_redis
from standardwebhooks.webhooks import Webhook

from broker.sessions.models import now_ms
from broker.webhooks.signing import new_secret
from tenants.crypto import CredentialCipher
from tenants.scope import WEBHOOK_PENDING, WEBHOOK_TENANTS, TenantScope
from workers.jobs.claim import HELD_LEASE_MS
from tests.fixtures.wait import wait_until_async

from .harness import wait_until

pytestmark = pytest.mark.fault

LEASE_S = HELD_LEASE_MS / 1000


class HoldingReceiver:
    """Verifies every POST with standardwebhooks; holds the first one until released."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.posts: list[dict[str, Any]] = []
        self.first_arrived = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                event = Webhook(outer.secret).verify(body, headers)  # raises (500) if it does not verify
                first = not outer.posts
                outer.posts.append({"id": headers["webhook-id"], "type": event["type"], "at": time.time(),
                                    "session": event["data"]["session"]["id"]})
                if first:
                    outer.first_arrived.set()
                    outer.release.wait(30)
                    return  # the worker is dead by now: no answer
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_sigkill_mid_post_is_delivered_by_another_worker_after_the_lease(make_harness, make_ledger) -> None:
    """Invariant: a delivery whose worker was SIGKILLed mid-POST is neither lost nor reordered:
    another worker delivers it, with the same webhook-id (the event id), once the dead worker's
    claim has run out (the 3 s lease after its last renewal, renewed every second), then the
    session's next event; every POST verifies; nothing stays queued; the killed attempt is not
    counted (the attempt log's successful line says attempt 1)."""
    h = make_harness(BROKER_WEBHOOK_ALLOW_PRIVATE="true")
    w1 = h.worker()
    led = make_ledger(h)
    r = sync_redis.Redis.from_url(h.settings.redis_url)
    secret = new_secret()
    receiver = HoldingReceiver(secret)
    try:
        scope = TenantScope(led.tenant_id)
        weid = "we_" + "1" * 24
        r.hset(scope.webhook_endpoint(weid), mapping={
            "url": receiver.url, "description": "", "events": "", "disabled": "0", "disabled_reason": "",
            "secret_enc": CredentialCipher(h.settings.secret_keys).encrypt(secret), "prev_secret_enc": "",
            "prev_secret_until": "", "disabled_at": "", "failing_since": "", "created_at": str(now_ms()),
            "since": f"{now_ms() - 1}-0"})
        r.sadd(scope.webhook_endpoints(), weid)
        r.sadd(WEBHOOK_TENANTS, led.tenant_id)

        sid = led.create(ttl=120, wait=10)  # session.created, then session.ready
        assert receiver.first_arrived.wait(15), "the first delivery never arrived"
        held = receiver.posts[0]
        assert held["type"] == "session.created"
        w1.kill()
        killed_at = time.time()
        w2 = h.worker(BROKER_WEBHOOK_ALLOW_PRIVATE="true")

        def delivered() -> bool:
            return [p["type"] for p in receiver.posts[1:]] == ["session.created", "session.ready"]

        wait_until(delivered, w2.startup_s + LEASE_S + 10, "the held event and the next one delivered")
        again = receiver.posts[1]
        assert again["id"] == held["id"]  # same webhook-id on the retry
        assert again["at"] - killed_at >= LEASE_S - 1.0 - 0.5  # not before the lease (renewed <= 1 s before the kill)
        assert again["at"] - killed_at <= w2.startup_s + LEASE_S + 3.0
        assert {p["session"] for p in receiver.posts} == {sid}
        wait_until(lambda: int(r.get(WEBHOOK_PENDING) or 0) == 0, 10, "nothing left queued")
        log = [{k.decode(): v.decode() for k, v in raw.items()} for _, raw in r.xrange(scope.webhook_attempts(weid))]
        first_ok = next(e for e in log if e["event_id"] == held["id"])
        assert first_ok["status"] == "200" and first_ok["attempt"] == "1"
    finally:
        receiver.close()
        r.close()


def test_redis_restart_pauses_delivery_which_goes_on_by_itself(private_redis) -> None:
    """Invariant: Redis going away (SIGKILL, restarted from its AOF) only pauses the fan-out and
    delivery loops: events recorded before and after the restart are all delivered, in order per
    session, without restarting the worker; the loops counted the Redis errors."""
    import asyncio

    import redis.asyncio as aioredis

    from tenants.crypto import generate_secret_key
    from tests.webhooks.helpers import create_endpoint, session_event
    from tests.webhooks.receiver import Receiver
    from workers.metrics import WorkerMetrics
    from workers.webhooks import WebhookDelivery

    async def scenario() -> None:
        cipher = CredentialCipher([generate_secret_key()])
        receiver = await Receiver().start()
        r = aioredis.Redis.from_url(private_redis.url)
        worker_redis = aioredis.Redis.from_url(private_redis.url, socket_timeout=2)
        d = None
        try:
            weid, secret = await create_endpoint(r, cipher, "ten_rr", receiver.url("x"))
            receiver.expect("x", secret)
            d = WebhookDelivery(worker_redis, cipher,
                                WorkerMetrics(), allow_private=True, sweep_s=0.5).start()
            before = ["evt_" + await session_event(r, "ten_rr", "sess_1", "session.created")]
            await _until_async(lambda: len(receiver.of("x")) == 1, 10)
            # (a completion lost with the AOF's last second only means a repeat, same webhook-id)
            private_redis.stop(kill=True)
            await _until_async(lambda: d.metrics.registry.get_sample_value(
                "broker_redis_errors_total", {"source": "webhooks"}) > 0, 10)
            private_redis.start()
            after = ["evt_" + await session_event(r, "ten_rr", "sess_1", etype, status)
                     for etype, status in (("session.ready", "ready"), ("session.terminated", "terminated"))]
            await _until_async(lambda: len({x.webhook_id for x in receiver.of("x")}) == 3, 20)
            ids = [x.webhook_id for x in receiver.of("x")]
            first_seen = sorted(set(ids), key=ids.index)
            assert first_seen == before + after  # order kept (a repeat, same webhook-id, is allowed)
            assert not receiver.unverified
        finally:
            if d is not None:
                await d.stop()
            await worker_redis.aclose()
            await r.aclose()
            await receiver.stop()

    asyncio.run(scenario())


async def _until_async(predicate: Any, timeout: float) -> None:
    await wait_until_async(predicate, timeout, "the condition")
