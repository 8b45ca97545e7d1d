"""``session-broker dev``: the whole system on one machine.

Redis (embedded, with AOF, in ``.dev/redis``, unless BROKER_REDIS_URL is set), the
sandbox upstreams, one API and one worker process; a demo tenant with a fresh API key;
a curl line that works. Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .embedded_redis import EmbeddedRedis
from .settings import Settings

DEMO_TENANT = "demo"


def _secret(path: Path, make: Any) -> str:
    if path.exists():
        return path.read_text().strip()
    value = str(make())
    path.write_text(value)
    path.chmod(0o600)
    return value


def _wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f}s")


def run_dev(args: argparse.Namespace) -> int:
    import secrets as pysecrets

    from tenants.crypto import generate_secret_key

    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    redis: EmbeddedRedis | None = None
    if settings.redis_configured:
        redis_url = settings.redis_url
    else:
        (data / "redis").mkdir(exist_ok=True)
        redis = EmbeddedRedis(data_dir=str((data / "redis").resolve()))
        redis.start()
        redis_url = redis.url
    sandbox = f"http://127.0.0.1:{args.sandbox_port}"
    admin_token = _secret(data / "admin_token", lambda: pysecrets.token_urlsafe(24))
    env = dict(os.environ)
    env.update(
        BROKER_REDIS_URL=redis_url,
        BROKER_SECRET_KEY=",".join(settings.secret_keys) or _secret(data / "secret_key", generate_secret_key),
        BROKER_ADMIN_TOKEN=admin_token,
        BROKER_OPENAI_BASE_URL=f"{sandbox}/v1",
        BROKER_AVATURN_BASE_URL=f"{sandbox}/api/v1",
        BROKER_OPENAI_API_KEY=settings.openai_api_key or "sk-sandbox-platform-key",
        BROKER_AVATURN_API_KEY=settings.avaturn_api_key or "avaturn-sandbox-platform-key",
        BROKER_LOG_FORMAT=os.environ.get("BROKER_LOG_FORMAT", "console"),
    )
    cli = [sys.executable, "-m", "broker.cli"]
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*cli, *argv], env=env)
        procs.append(proc)
        return proc

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                proc.kill()
        if redis is not None:
            redis.stop()

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _wait_http(f"{sandbox}/_sandbox/healthz", proc=spawn("sandbox", "--port", str(args.sandbox_port)))
        api = f"http://127.0.0.1:{args.port}"
        _wait_http(f"{api}/readyz", proc=spawn("api", "--port", str(args.port)))
        worker = spawn("worker", "--metrics-port", str(args.metrics_port), "--metrics-host", "127.0.0.1")
        _wait_http(f"http://127.0.0.1:{args.metrics_port}/healthz", proc=worker)
        key = _demo_key(api, admin_token)
        _banner(api, sandbox, args.metrics_port, redis_url, key, admin_token)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        failed = [p.args for p in procs if p.poll() is not None]
        print(f"session-broker dev: a process exited: {failed}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    except RuntimeError as exc:
        print(f"session-broker dev: {exc}", file=sys.stderr)
        return 1
    finally:
        stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _demo_key(api: str, admin_token: str) -> str:
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=api, headers=headers, timeout=10) as client:
        demo, cursor = None, None
        while demo is None:
            page = client.get("/admin/v1/tenants", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
            page.raise_for_status()
            demo = next((t for t in page.json()["data"] if t["name"] == DEMO_TENANT), None)
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
        if demo is None:
            demo = client.post("/admin/v1/tenants", json={
                "name": DEMO_TENANT,
                "quotas": {"max_concurrent_sessions": 5, "max_session_seconds": 600},
                "openai": {"session": {"model": "gpt-realtime", "instructions": "You are a friendly demo avatar.",
                                       "audio": {"output": {"voice": "marin"}}}},
            }).json()
        created = client.post(f"/admin/v1/tenants/{demo['id']}/keys").json()
        return str(created["key"])


def _banner(api: str, sandbox: str, metrics_port: int, redis_url: str, key: str, admin_token: str) -> None:
    curl = (
        f"curl -s -X POST '{api}/v1/sessions?wait=10' -H 'Authorization: Bearer {key}' "
        "-H 'Content-Type: application/json' -d '{\"ttl_seconds\": 60, \"end_user\": \"u_1\"}'"
    )
    print(json.dumps({"event": "dev_ready"}), file=sys.stderr)
    print(f"""
Session Broker is running.
  API          {api}   (OpenAPI: {api}/schema/openapi.json, metrics: {api}/metrics)
  console      {api}/console   (sign in with the demo key below)
  worker       metrics http://127.0.0.1:{metrics_port}/metrics
  sandbox      {sandbox}   (audit: {sandbox}/_sandbox/audit)
  redis        {redis_url}
  admin token  {admin_token}

Demo tenant API key (shown once):
  {key}

Create a session and wait until it is ready:
  {curl}

Then: GET {api}/v1/sessions/<id>, DELETE {api}/v1/sessions/<id>. Ctrl-C stops everything.
""", flush=True)
