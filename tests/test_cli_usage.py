"""``session-broker usage export`` as operators run it (a real process against real Redis):
CSV and NDJSON rows per tenant and UTC day, equal to the sessions' billable seconds."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime

import redis.asyncio as aioredis

from broker.sessions.repository import SessionRepository
from tenants.admission import AdmissionRequest, Admitted, admit
from tenants.models import Quotas
from tests.test_cli import cli_env, run  # noqa: F401  (cli_env is a fixture)

T0 = int(datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp() * 1000)
DAY = 86_400_000


async def _one_session(url: str, tenant: str, sid: str, now: int, ready_after: int, ends_after: int) -> None:
    redis = aioredis.Redis.from_url(url)
    try:
        q = Quotas(session_seconds_per_month=100_000)
        out = await admit(redis, AdmissionRequest(
            tenant_id=tenant, session_id=sid, now_ms=now, quotas=q,
            session_fields={"id": sid, "tenant_id": tenant, "status": "queued", "created_at": str(now)},
            lease_until_ms=now + 600_000, mint_window_ms=3_600_000, ttl_seconds=600))
        assert isinstance(out, Admitted)
        repo = SessionRepository(redis)
        rec = await repo.get(tenant, sid)
        assert rec is not None
        res = await repo.transition(rec, allowed="*", status="terminated", lease="del", due_expiry="del",
                                    due_provision="del", fields={"ready_at": now + ready_after,
                                                                 "terminated_at": now + ends_after}, retain=True)
        assert res.applied
    finally:
        await redis.aclose()


def test_usage_export_csv_and_ndjson(cli_env: dict[str, str]) -> None:
    url = cli_env["BROKER_REDIS_URL"]
    created = json.loads(run("tenants", "create", "--name", "billed", env=cli_env).stdout)
    tid = created["id"]
    asyncio.run(_one_session(url, tid, "ses_a", T0, 1000, 62_500))          # 62 s (61.5 rounded up)
    asyncio.run(_one_session(url, tid, "ses_b", T0 + DAY, 1000, 11_000))    # 10 s, the next day
    out = run("usage", "export", "--from", "2026-11-22", "--to", "2026-11-24", env=cli_env).stdout
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [["tenant_id", "start", "sessions", "billable_seconds"],
                    [tid, "2026-11-22T00:00:00Z", "0", "0"],
                    [tid, "2026-11-23T00:00:00Z", "1", "62"],
                    [tid, "2026-11-24T00:00:00Z", "1", "10"]]
    nd = run("usage", "export", "--from", "2026-11-23", "--to", "2026-11-23", "--tenant", tid,
             "--format", "ndjson", env=cli_env).stdout
    assert [json.loads(line) for line in nd.splitlines()] == [
        {"tenant_id": tid, "start": "2026-11-23T00:00:00Z", "sessions": 1, "billable_seconds": 62}]
    bad = run("usage", "export", "--from", "2026-11-23", "--to", "2028-01-01", env=cli_env, check=False)
    assert bad.returncode == 2 and "invalid_range" in bad.stderr and bad.stdout == ""
    unknown = run("usage", "export", "--from", "2026-11-23", "--to", "2026-11-23", "--tenant", "ten_nope",
                  env=cli_env, check=False)
    assert unknown.returncode == 1 and "tenant_not_found" in unknown.stderr
