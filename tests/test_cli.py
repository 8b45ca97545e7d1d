"""The console script as operators use it: settings errors, secrets, tenant administration."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.embedded_redis import EmbeddedRedis
from tenants.crypto import generate_secret_key


def run(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "broker.cli", *args], env=full_env, capture_output=True,
                          text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def cli_env(redis_server: EmbeddedRedis) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return {"BROKER_REDIS_URL": redis_server.url, "BROKER_SECRET_KEY": generate_secret_key()}


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({}, "BROKER_SECRET_KEY"),
        ({"BROKER_SECRET_KEY": "not-a-key"}, "BROKER_SECRET_KEY"),
        ({"BROKER_REDIS_URL": "http://nope"}, "BROKER_REDIS_URL"),
        ({"BROKER_OPENAI_BASE_URL": "ftp://x"}, "BROKER_OPENAI_BASE_URL"),
        ({"BROKER_WORKER_MAX_JOBS": "many"}, "BROKER_WORKER_MAX_JOBS"),
    ],
)
def test_bad_setting_stops_with_one_line_naming_it(env: dict[str, str], variable: str) -> None:
    proc = run("api", "--port", "1", env=env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0], proc.stderr
    if "BROKER_SECRET_KEY" in env:
        assert env["BROKER_SECRET_KEY"] not in proc.stderr


def test_worker_also_requires_secret_key() -> None:
    proc = run("worker", env={}, check=False)
    assert proc.returncode == 2 and "BROKER_SECRET_KEY" in proc.stderr


def test_secrets_generate_prints_a_fernet_key() -> None:
    key = run("secrets", "generate").stdout.strip()
    assert len(base64.urlsafe_b64decode(key)) == 32


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_tenant_administration_round_trip(cli_env: dict[str, str], tmp_path: Path, redis_server: EmbeddedRedis) -> None:
    created = _json(run("tenants", "create", "--name", "acme", "--quotas", '{"max_concurrent_sessions": 3}',
                        "--openai-key", "sk-cli-tenant-secret-123456", env=cli_env))
    tid = created["id"]
    assert tid.startswith("ten_") and created["quotas"]["max_concurrent_sessions"] == 3
    assert created["openai"]["api_key_set"] is True and "sk-cli" not in json.dumps(created)
    assert _json(run("tenants", "show", tid, env=cli_env))["name"] == "acme"
    assert [t["id"] for t in _json(run("tenants", "list", env=cli_env))] == [tid]

    key = _json(run("tenants", "keys", "create", tid, env=cli_env))
    assert key["key"].startswith("sbk_") and key["id"].startswith("key_")
    listed = _json(run("tenants", "keys", "list", tid, env=cli_env))
    assert [k["id"] for k in listed] == [key["id"]] and key["key"] not in json.dumps(listed)
    run("tenants", "keys", "revoke", tid, key["id"], env=cli_env)
    assert _json(run("tenants", "keys", "list", tid, env=cli_env))[0]["revoked_at"] is not None

    updated = _json(run("tenants", "update", tid, "--json", '{"quotas": {"sessions_per_day": 7}}', env=cli_env))
    assert updated["quotas"]["sessions_per_day"] == 7 and updated["quotas"]["max_concurrent_sessions"] == 3
    disabled = _json(run("tenants", "disable", tid, env=cli_env))
    assert disabled["tenant"]["status"] == "disabled"
    assert _json(run("tenants", "enable", tid, env=cli_env))["status"] == "active"

    spec = tmp_path / "tenants.json"
    spec.write_text(json.dumps([{"name": "acme", "quotas": {"sessions_per_day": 9}}, {"name": "beta"}]))
    applied = _json(run("tenants", "apply", str(spec), env=cli_env))
    assert [a["action"] for a in applied] == ["updated", "created"]
    assert applied[0]["tenant"]["quotas"]["sessions_per_day"] == 9

    import redis

    client = redis.Redis.from_url(redis_server.url)
    dump = b"".join(client.dump(k) or b"" for k in client.keys("*"))
    client.close()
    assert b"sk-cli-tenant-secret-123456" not in dump and key["key"].encode() not in dump


def test_cli_errors_are_one_line(cli_env: dict[str, str]) -> None:
    proc = run("tenants", "show", "ten_missing", env=cli_env, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "tenant_not_found" in proc.stderr
    proc = run("tenants", "create", "--name", "x", "--quotas", '{"max_session_seconds": 99999}', env=cli_env, check=False)
    assert proc.returncode == 1 and "quotas.max_session_seconds" in proc.stderr
