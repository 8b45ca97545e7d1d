"""Tenant upstream credentials at rest: Fernet under BROKER_SECRET_KEY, never returned by any API
(the admin API shows only ``api_key_set``), and re-encrypted by ``session-broker secrets rotate``
with a new key first, after which a broker holding only the new key still uses them."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet, InvalidToken

from broker.embedded_redis import EmbeddedRedis
from broker.core.settings import Settings
from tenants.crypto import generate_secret_key
from tests.fixtures.stack import Admin, ApiServer, WorkerThread, make_settings, tenant_client
from workers.sandbox import SandboxServer, fingerprint

from .support import leaked_fragments, redis_dump


def _credentials() -> tuple[str, str]:
    return "sk-tenant-" + secrets.token_hex(16), "avt-tenant-" + secrets.token_hex(16)


def _stored(redis_url: str, tenant_id: str) -> dict[str, Any]:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        raw = client.get(f"sb:tenant:{tenant_id}")
    finally:
        client.close()
    assert raw is not None
    return json.loads(raw)


def _assert_not_in(text: str, *plaintexts: str) -> None:
    for plain in plaintexts:
        assert plain not in text
        assert not leaked_fragments(plain, text), plain[:6]


def test_credentials_are_fernet_tokens_in_redis(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: Redis holds tenant upstream keys only as Fernet tokens under BROKER_SECRET_KEY;
    no 8-character piece of a plaintext is stored, before or after a PATCH replaces them."""
    openai_key, avaturn_key = _credentials()
    tenant, _ = admin.tenant("a", openai={"api_key": openai_key}, avaturn={"api_key": avaturn_key})
    record = _stored(settings.redis_url, tenant["id"])
    fernet = Fernet(settings.secret_keys[0].encode())
    assert fernet.decrypt(record["openai"]["api_key_enc"].encode()).decode() == openai_key
    assert fernet.decrypt(record["avaturn"]["api_key_enc"].encode()).decode() == avaturn_key
    _assert_not_in(redis_dump(settings.redis_url), openai_key, avaturn_key)
    new_openai, new_avaturn = _credentials()
    patched = admin.http.patch(f"/admin/v1/tenants/{tenant['id']}",
                               json={"openai": {"api_key": new_openai}, "avaturn": {"api_key": new_avaturn}})
    assert patched.status_code == 200, patched.text
    record = _stored(settings.redis_url, tenant["id"])
    assert fernet.decrypt(record["openai"]["api_key_enc"].encode()).decode() == new_openai
    _assert_not_in(redis_dump(settings.redis_url), openai_key, avaturn_key, new_openai, new_avaturn)


def test_admin_api_shows_only_whether_credentials_are_set(api: ApiServer, admin: Admin, settings: Settings) -> None:
    """Invariant: no admin answer (create, get, list, patch, disable, enable, keys) carries a
    credential, its ciphertext or an ``api_key`` field: only ``api_key_set``."""
    openai_key, avaturn_key = _credentials()
    r = admin.http.post("/admin/v1/tenants", json={"name": "a", "openai": {"api_key": openai_key},
                                                   "avaturn": {"api_key": avaturn_key}})
    assert r.status_code == 201
    tid = r.json()["id"]
    record = _stored(settings.redis_url, tid)
    ciphertexts = (record["openai"]["api_key_enc"], record["avaturn"]["api_key_enc"])
    answers = [r]
    answers.append(admin.http.get(f"/admin/v1/tenants/{tid}"))
    answers.append(admin.http.get("/admin/v1/tenants"))
    answers.append(admin.http.patch(f"/admin/v1/tenants/{tid}", json={"name": "a2"}))
    answers.append(admin.http.post(f"/admin/v1/tenants/{tid}/disable"))
    answers.append(admin.http.post(f"/admin/v1/tenants/{tid}/enable"))
    answers.append(admin.http.post(f"/admin/v1/tenants/{tid}/keys"))
    answers.append(admin.http.get(f"/admin/v1/tenants/{tid}/keys"))
    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        _assert_not_in(answer.text + str(answer.headers), openai_key, avaturn_key, *ciphertexts)
        assert "api_key_enc" not in answer.text and '"api_key"' not in answer.text
    view = answers[1].json()
    assert view["openai"]["api_key_set"] is True and view["avaturn"]["api_key_set"] is True
    cleared = admin.http.patch(f"/admin/v1/tenants/{tid}", json={"openai": {"api_key": ""}}).json()
    assert cleared["openai"]["api_key_set"] is False and cleared["avaturn"]["api_key_set"] is True


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "session-broker")
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return subprocess.run([exe, *args], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_secrets_rotate_reencrypts_with_the_new_first_key(
    redis_server: EmbeddedRedis, sandbox: SandboxServer, settings: Settings, api: ApiServer, admin: Admin
) -> None:
    """Invariant: `session-broker secrets rotate` with BROKER_SECRET_KEY="new,old" re-encrypts every
    stored credential with the new key (the old key no longer decrypts them), prints no secret,
    and a broker holding only the new key mints with the tenant's own keys afterwards."""
    old_key = settings.secret_keys[0]
    new_key = generate_secret_key()
    creds = [_credentials() for _ in range(2)]
    tenants = [admin.tenant(f"t{i}", openai={"api_key": o}, avaturn={"api_key": a}) for i, (o, a) in enumerate(creds)]
    admin.tenant("platform-creds-only")
    env = {"BROKER_REDIS_URL": settings.redis_url}

    # a key that decrypts nothing: refused, naming the setting, and nothing is rewritten
    wrong = _cli({**env, "BROKER_SECRET_KEY": generate_secret_key()}, "secrets", "rotate")
    assert wrong.returncode != 0 and "BROKER_SECRET_KEY" in wrong.stderr + wrong.stdout
    assert Fernet(old_key.encode()).decrypt(_stored(settings.redis_url, tenants[0][0]["id"])["openai"]["api_key_enc"].encode())
    done = _cli({**env, "BROKER_SECRET_KEY": f"{new_key},{old_key}"}, "secrets", "rotate")
    assert done.returncode == 0, done.stderr
    assert "2 tenant(s)" in done.stdout
    for text in (done.stdout + done.stderr, wrong.stdout + wrong.stderr):
        _assert_not_in(text, new_key, old_key, *[c for pair in creds for c in pair])
    for (tenant, _), (openai_key, avaturn_key) in zip(tenants, creds, strict=True):
        record = _stored(settings.redis_url, tenant["id"])
        token = record["openai"]["api_key_enc"].encode()
        assert Fernet(new_key.encode()).decrypt(token).decode() == openai_key
        with pytest.raises(InvalidToken):
            Fernet(old_key.encode()).decrypt(token)
        assert Fernet(new_key.encode()).decrypt(record["avaturn"]["api_key_enc"].encode()).decode() == avaturn_key

    rotated = make_settings(redis_server.url, sandbox, BROKER_SECRET_KEY=new_key)
    server, worker = ApiServer(rotated).start(), WorkerThread(rotated).start()
    try:
        _, key = tenants[0]
        with tenant_client(server.url, key) as c:
            r = c.post("/v1/sessions?wait=10")
            assert r.status_code == 201, r.text
    finally:
        worker.stop()
        server.stop()
    audit = sandbox.audit()
    assert [s["key_fingerprint"] for s in audit["secrets"]] == [fingerprint(creds[0][0])]
    assert [s["key_fingerprint"] for s in audit["sessions"]] == [fingerprint(creds[0][1])]
    assert httpx.get(f"{api.url}/healthz").status_code == 200
