"""``rediss://`` works end to end: nothing between BROKER_REDIS_URL and the socket strips TLS
or its options. Redis is reached through a TLS front (tls_proxy.py) with a self-signed
certificate; the API and a worker provision a session over it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.embedded_redis import EmbeddedRedis
from broker.core.redis_client import create_redis, create_worker_pool
from broker.core.settings import Settings
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, make_settings, tenant_client

from .tls_proxy import TlsProxy, self_signed


@pytest.fixture
def tls(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[tuple[TlsProxy, Path]]:
    cert, key = self_signed(tmp_path)
    proxy = TlsProxy(redis_server.port, cert, key).start()
    try:
        yield proxy, cert
    finally:
        proxy.stop()


async def test_rediss_url_speaks_verified_tls(tls: tuple[TlsProxy, Path]) -> None:
    """Invariant: a rediss:// URL gives a verified TLS connection (the CA from the URL's
    ssl_ca_certs); without the CA the certificate is refused. The API client and the worker
    pool behave the same."""
    proxy, cert = tls
    url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}"
    settings = Settings.from_env({"BROKER_REDIS_URL": url})
    for client in (create_redis(settings), create_worker_pool(settings)):
        try:
            assert await client.set("sb:test:tls", "ok")
            assert await client.get("sb:test:tls") == b"ok"
        finally:
            await client.aclose()
    assert proxy.tls_sessions >= 2
    unverified = create_redis(Settings.from_env({"BROKER_REDIS_URL": f"rediss://127.0.0.1:{proxy.port}/0"}))
    try:
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await unverified.ping()
    finally:
        await unverified.aclose()


def test_session_is_provisioned_over_tls(tls: tuple[TlsProxy, Path], sandbox: Any) -> None:
    proxy, cert = tls
    settings = make_settings(f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={cert}", sandbox)
    api = ApiServer(settings).start()
    worker = WorkerThread(settings).start()
    admin = Admin(api.url)
    try:
        assert httpx.get(f"{api.url}/readyz").status_code == 200
        _, key = admin.tenant("tls")
        with tenant_client(api.url, key) as c:
            r = c.post("/v1/sessions?wait=10")
            assert r.status_code == 201, r.text
            assert r.json()["avaturn"]["token"]
        assert proxy.tls_sessions >= 3  # API, worker pool and the worker's job client
    finally:
        admin.close()
        worker.stop()
        api.stop()
