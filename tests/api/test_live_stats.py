"""The live-sessions-by-state counts (sb:stats:live) that the dashboards read stay exact
through admission, replacement, provisioning and termination."""

from __future__ import annotations

import redis as sync_redis

from tests.fixtures.stack import Admin, tenant_client, wait_status


def _stats(url: str) -> dict[str, int]:
    client = sync_redis.Redis.from_url(url)
    try:
        raw = client.hgetall("sb:stats:live")
    finally:
        client.close()
    return {k.decode(): int(v) for k, v in raw.items() if int(v)}


def test_stats_follow_every_transition(settings, api, worker, admin: Admin) -> None:
    _, key = admin.tenant("a", quotas={"max_sessions_per_end_user": 1, "end_user_policy": "replace_oldest"})
    with tenant_client(api.url, key) as c:
        first = c.post("/v1/sessions?wait=10", json={"end_user": "u"}).json()
        assert first["status"] == "ready"
        assert _stats(settings.redis_url) == {"ready": 1}
        second = c.post("/v1/sessions?wait=10", json={"end_user": "u"}).json()
        assert second["status"] == "ready"
        replaced = wait_status(c, first["id"], {"terminated"})
        assert replaced["termination_reason"] == "replaced"
        assert _stats(settings.redis_url) == {"ready": 1}
        c.delete(f"/v1/sessions/{second['id']}")
        wait_status(c, second["id"], {"terminated"})
        assert _stats(settings.redis_url) == {}
