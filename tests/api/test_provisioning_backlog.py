"""``429 provisioning_backlog`` end to end over real HTTP (uvicorn on loopback, real Redis):
a session whose mint slot would come after its provisioning window is refused at admission
with Retry-After, the mint pacing in RateLimit-Policy / RateLimit (parsed with http_sfv), and
the limit and backlog in the error body; admitted sessions carry their slot (``mint_at``)
and are in the provisioning schedule. No worker runs: admission alone decides."""

from __future__ import annotations

import re

import httpx
import redis as sync_redis

from broker.core.settings import Settings
from tests.api.test_ratelimit_headers import parse
from tests.fixtures.stack import Admin, ApiServer, tenant_client
from tenants.scope import PROVISION_TENANTS, TenantScope

PER_MINUTE = 6  # emission interval T = 10 s, burst 6


def test_backlog_refusal_over_http(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: with openai_requests_per_minute=6 (burst 6, then one slot per 10 s) and the
    test deployment's 16 s mint window (deadline 20 s - 2 x 2 s upstream timeout), exactly 7
    sessions posted at once are admitted (6 at now, 1 at +10 s); the 8th (slot at +20 s) is
    429 provisioning_backlog: Retry-After = the seconds until its slot fits, equal to the
    body's retry_after and to the "mint" item's t (r=0); the body states limit 6 and a backlog
    of 1; RateLimit-Policy has "mint";q=6;w=60. Each 202 reports the sessions that still fit."""
    assert settings.mint_window_seconds() == 16.0
    tenant, key = admin.tenant("paced", quotas={"openai_requests_per_minute": PER_MINUTE})
    redis = sync_redis.Redis.from_url(settings.redis_url)
    try:
        with tenant_client(api.url, key) as c:
            ids = []
            for i in range(7):
                r = c.post("/v1/sessions")
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
                assert parse(r.headers["ratelimit-policy"])["mint"] == {"q": PER_MINUTE, "w": 60}
                mint = parse(r.headers["ratelimit"])["mint"]
                assert mint["r"] == 6 - i, (i, mint)
            assert "t" in mint and 1 <= mint["t"] <= 4  # r=0: when the next one fits
            refused = c.post("/v1/sessions")
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert set(refused.json()) == {"error"}
        assert error["code"] == "provisioning_backlog"
        assert (error["limit"], error["current"], error["backlog"]) == (PER_MINUTE, 1, 1)
        assert re.search(r"openai_requests_per_minute", error["message"])
        retry_after = int(refused.headers["retry-after"])
        assert 1 <= retry_after <= 4 and error["retry_after"] == retry_after
        assert parse(refused.headers["ratelimit"])["mint"] == {"r": 0, "t": retry_after}
        policy = parse(refused.headers["ratelimit-policy"])
        assert policy["mint"] == {"q": PER_MINUTE, "w": 60} and set(policy) >= {"minute", "day", "concurrency"}
        # the slots as stored: the burst at once (each at its own admission time), the 7th one
        # T after the first (the schedule's theoretical arrival time, not the 7th's own time)
        scope = TenantScope(tenant["id"])
        created = [int(redis.hget(scope.session(sid), "created_at")) for sid in ids]
        slots = [int(redis.hget(scope.session(sid), "mint_at")) for sid in ids]
        assert slots == created[:6] + [created[0] + 10_000]
        assert {m.decode(): int(s) for m, s in redis.zrange(scope.provision_schedule(), 0, -1, withscores=True)} == (
            dict(zip(ids, slots, strict=True)))
        assert redis.zscore(PROVISION_TENANTS, tenant["id"]) == created[0]
        assert len(redis.keys(scope.session("*"))) == 7  # the refusal wrote no session
    finally:
        redis.close()
    metrics = httpx.get(f"{api.url}/metrics").text
    assert re.search(r'broker_admissions_total\{[^}]*reason="provisioning_backlog"[^}]*\} 1\.0', metrics), (
        [line for line in metrics.splitlines() if line.startswith("broker_admissions_total")])


def test_openapi_lists_the_refusal(api: ApiServer) -> None:
    """Invariant: the OpenAPI document's 429 of POST /v1/sessions names provisioning_backlog and
    the error schema documents its backlog field."""
    doc = httpx.get(f"{api.url}/schema/openapi.json").json()
    too_many = doc["paths"]["/v1/sessions"]["post"]["responses"]["429"]
    assert "provisioning_backlog" in too_many["description"]
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(too_many["headers"])
    error = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    assert error["backlog"]["type"] == "integer"
