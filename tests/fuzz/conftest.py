"""Fuzzing fixtures: a LIVE broker (uvicorn on loopback, real Redis, an arq worker, the sandbox
upstreams) shared by the whole fuzz module, a tenant with a key, and the run's budget.

``pytest tests/fuzz`` is the short bounded run that ``make test`` includes (fixed seed, a few
dozen examples per operation and mode); ``make fuzz`` adds ``--fuzz-long`` (hundreds per
operation). ``--fuzz-seed N`` replays another seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import ADMIN_TOKEN, ApiServer, WorkerThread, make_settings
from workers.sandbox import SandboxServer

SHORT_EXAMPLES = 25
LONG_EXAMPLES = 600
DEFAULT_SEED = 20261123
FUZZ_QUOTAS = {
    "sessions_per_minute": 100_000,
    "max_concurrent_sessions": 100_000,
    "sessions_per_day": 10_000_000,
    "max_session_seconds": 7200,
    "max_sessions_per_end_user": 1000,
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fuzz", "schemathesis fuzzing of the broker's OpenAPI schema")
    group.addoption("--fuzz-long", action="store_true", default=False,
                    help=f"long fuzzing run ({LONG_EXAMPLES} examples per operation and mode)")
    group.addoption("--fuzz-seed", type=int, default=DEFAULT_SEED, help="hypothesis seed of the fuzzing run")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--fuzz-long", default=False):
        for item in items:  # a long run outlasts the suite's 120 s per-test timeout
            if "tests/fuzz/" in item.nodeid:
                item.add_marker(pytest.mark.timeout(1800))


@dataclass(frozen=True)
class FuzzBudget:
    max_examples: int
    seed: int


@dataclass(frozen=True)
class LiveBroker:
    url: str
    tenant_key: str
    tenant_id: str
    # path template (or "METHOD template" for one method only) -> path parameters of objects that exist
    # (a fuzzer's random ids only ever reach 404)
    known_ids: dict[str, list[dict[str, str]]]

    def ids_for(self, method: str, path: str) -> list[dict[str, str]]:
        return self.known_ids.get(f"{method.upper()} {path}") or self.known_ids.get(path, [])

    def headers_for(self, path: str) -> dict[str, str]:
        token = ADMIN_TOKEN if path.startswith("/admin/") else self.tenant_key
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def fuzz_budget(request: pytest.FixtureRequest) -> FuzzBudget:
    # getoption with a default: the options exist only when this conftest was loaded at start-up
    long_run = bool(request.config.getoption("--fuzz-long", default=False))
    seed = int(request.config.getoption("--fuzz-seed", default=DEFAULT_SEED))
    return FuzzBudget(max_examples=LONG_EXAMPLES if long_run else SHORT_EXAMPLES, seed=seed)


@pytest.fixture(scope="module")
def live_broker(redis_server: EmbeddedRedis, sandbox_server: SandboxServer) -> Iterator[LiveBroker]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    sandbox_server.reset()
    settings = make_settings(redis_server.url, sandbox_server)
    api = ApiServer(settings).start()
    worker = WorkerThread(settings).start()
    try:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
            tenant_id, key = _tenant_with_key(admin, "fuzz")
            # the admin operations get their own target, so a fuzzed PATCH or disable cannot
            # disable the tenant whose key the tenant operations use
            target_id, _ = _tenant_with_key(admin, "fuzz-admin-target")
            # one key for the fuzzed revocations, five for the rotations (a rotation may end its key at once)
            key_ids = [admin.post(f"/admin/v1/tenants/{target_id}/keys").json()["id"] for _ in range(6)]
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as tenant:
            session_ids = [tenant.post("/v1/sessions").json()["id"] for _ in range(3)]
            # webhook endpoints (a literal public address: no DNS): one for the fuzzed DELETE alone
            endpoint_id, doomed_id = (
                tenant.post("/v1/webhook_endpoints", json={"url": "https://93.184.216.34/hook"}).json()["id"]
                for _ in range(2))
            event_ids = [e["id"] for e in tenant.get("/v1/events").json()["data"]]
        endpoint = [{"endpoint_id": endpoint_id}]
        tenant_ids = [{"tenant_id": target_id}]
        known_ids = {
            "/v1/sessions/{session_id}": [{"session_id": sid} for sid in session_ids],
            **{f"/admin/v1/tenants/{{tenant_id}}{suffix}": tenant_ids for suffix in ("", "/disable", "/enable", "/keys")},
            "/admin/v1/tenants/{tenant_id}/keys/{key_id}": [{"tenant_id": target_id, "key_id": key_ids[0]}],
            **{f"/v1/webhook_endpoints/{{endpoint_id}}{suffix}": endpoint
               for suffix in ("", "/rotate_secret", "/test", "/attempts")},
            "DELETE /v1/webhook_endpoints/{endpoint_id}": [{"endpoint_id": doomed_id}],
            "/v1/events/{event_id}/resend": [{"event_id": eid} for eid in event_ids],
            "/admin/v1/tenants/{tenant_id}/keys/{key_id}/rotate": [
                {"tenant_id": target_id, "key_id": k} for k in key_ids[1:]
            ],
        }
        yield LiveBroker(url=api.url, tenant_key=key, tenant_id=tenant_id, known_ids=known_ids)
    finally:
        worker.stop()
        api.stop()


def _tenant_with_key(admin: httpx.Client, name: str) -> tuple[str, str]:
    tenant = admin.post("/admin/v1/tenants", json={"name": name, "quotas": FUZZ_QUOTAS})
    assert tenant.status_code == 201, tenant.text
    tenant_id = tenant.json()["id"]
    key = admin.post(f"/admin/v1/tenants/{tenant_id}/keys")
    assert key.status_code == 201, key.text
    return tenant_id, key.json()["key"]
