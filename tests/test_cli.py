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
    revoked = _json(run("tenants", "keys", "revoke", tid, key["id"], env=cli_env))
    assert revoked["id"] == key["id"] and revoked["revoked"] is True and revoked["revoked_at"] is not None
    assert revoked["prefix"] == key["prefix"] and key["key"] not in json.dumps(revoked)
    assert _json(run("tenants", "keys", "list", tid, env=cli_env))[0]["revoked_at"] is not None

    updated = _json(run("tenants", "update", tid, "--json", '{"quotas": {"sessions_per_day": 7}}', env=cli_env))
    assert updated["quotas"]["sessions_per_day"] == 7 and updated["quotas"]["max_concurrent_sessions"] == 3
    disabled = _json(run("tenants", "disable", tid, env=cli_env))  # the admin API's shape (tests/api)
    assert disabled["status"] == "disabled" and disabled["id"] == tid and disabled["sessions_stopped"] == 0
    assert _json(run("tenants", "enable", tid, env=cli_env))["status"] == "active"

    spec = tmp_path / "tenants.json"
    spec.write_text(json.dumps([{"name": "acme", "quotas": {"sessions_per_day": 9}}, {"name": "beta"}]))
    applied = _json(run("tenants", "apply", str(spec), env=cli_env))
    assert [a["action"] for a in applied] == ["updated", "created"] and [a["entry"] for a in applied] == [0, 1]
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


def test_bad_flag_values_name_the_flag(cli_env: dict[str, str]) -> None:
    cases = [
        (("tenants", "create", "--name", "x", "--quotas", "{max: 1}"), "--quotas"),
        (("tenants", "create", "--name", "x", "--quotas", "[1]"), "--quotas"),
        (("tenants", "create", "--name", "x", "--json", "{"), "--json"),
        (("tenants", "update", "ten_x", "--json", "nope"), "--json"),
        (("tenants", "keys", "create", "ten_x", "--not-after", "next tuesday"), "--not-after"),
    ]
    for argv, flag in cases:
        proc = run(*argv, env=cli_env, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and flag in lines[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_help_lists_every_keys_subcommand_and_the_defaults() -> None:
    keys_help = run("tenants", "keys", "--help").stdout
    for sub in ("create", "list", "revoke"):
        line = next(x for x in keys_help.splitlines() if x.strip().startswith(sub + " "))
        assert len(line.split()) > 1, f"{sub} has no help: {line!r}"
    for cmd, expected in (("api", ("default: 8000", "BROKER_REDIS_URL", "BROKER_SECRET_KEY")),
                          ("dev", ("default: 8000", "default: .dev", "BROKER_REDIS_URL", ".dev/env"))):
        text = run(cmd, "--help").stdout
        for fragment in expected:
            assert fragment in text, (cmd, fragment, text)


def test_names_are_unique_and_a_duplicate_is_one_line(cli_env: dict[str, str]) -> None:
    first = _json(run("tenants", "create", "--name", "acme", env=cli_env))
    proc = run("tenants", "create", "--name", "acme", env=cli_env, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "tenant_name_taken" in proc.stderr and first["id"] in proc.stderr
    assert [t["name"] for t in _json(run("tenants", "list", env=cli_env))] == ["acme"]


def test_apply_checks_every_entry_before_writing_and_reports_each(cli_env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "tenants.json"
    spec.write_text(json.dumps([{"name": "acme"}, {"name": "beta", "quotas": {"max_session_seconds": 99999}},
                                {"name": "gamma", "nope": 1}]))
    proc = run("tenants", "apply", str(spec), env=cli_env, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "entry 1 ('beta')" in proc.stderr and "quotas.max_session_seconds" in proc.stderr
    assert "entry 2 ('gamma')" in proc.stderr and "nope" in proc.stderr
    assert _json(run("tenants", "list", env=cli_env)) == []  # the valid first entry was not created either

    body = [{"name": "acme", "quotas": {"sessions_per_day": 5}, "openai": {"api_key": "sk-apply-key-0001"}},
            {"name": "beta"}]
    spec.write_text(json.dumps(body))
    assert [a["action"] for a in _json(run("tenants", "apply", str(spec), env=cli_env))] == ["created", "created"]
    # the same file again: nothing to do (the API key compared by its plaintext)
    assert [a["action"] for a in _json(run("tenants", "apply", str(spec), env=cli_env))] == ["unchanged", "unchanged"]
    body[1]["quotas"] = {"sessions_per_day": 6}
    spec.write_text(json.dumps(body))
    again = _json(run("tenants", "apply", str(spec), env=cli_env))
    assert [a["action"] for a in again] == ["unchanged", "updated"]
    assert again[1]["tenant"]["quotas"]["sessions_per_day"] == 6
    # two entries that would end with one name: refused before anything is written
    spec.write_text(json.dumps([{"name": "delta"}, {"name": "delta"}]))
    proc = run("tenants", "apply", str(spec), env=cli_env, check=False)
    assert proc.returncode == 1 and "'delta'" in proc.stderr and "entry 0" in proc.stderr
    assert "delta" not in [t["name"] for t in _json(run("tenants", "list", env=cli_env))]


def _dead_port() -> int:
    from broker.embedded_redis import free_port

    return free_port()  # nothing listens there (a race with another bind is harmless: still not Redis)


@pytest.mark.parametrize("argv", [("tenants", "list"), ("tenants", "create", "--name", "x"),
                                  ("tenants", "keys", "list", "ten_x")])
def test_unreachable_redis_is_one_line_naming_the_url_without_its_password(argv: tuple[str, ...]) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{_dead_port()}/0"
    proc = run(*argv, env={"BROKER_REDIS_URL": url, "BROKER_SECRET_KEY": generate_secret_key()}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
    assert url.replace("hunter2-secret", "***") in lines[0] and "unreachable" in lines[0]
    assert "BROKER_REDIS_URL" in lines[0]  # what to do


def test_a_redis_url_with_a_database_that_is_not_a_number_is_refused() -> None:
    proc = run("tenants", "list", env={"BROKER_REDIS_URL": "redis://127.0.0.1:6390/abc"}, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "BROKER_REDIS_URL" in lines[0] and "'abc'" in lines[0]
