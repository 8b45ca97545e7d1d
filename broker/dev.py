"""``session-broker dev``: the whole system on one machine.

Redis (embedded, with AOF, in ``.dev/redis``, unless BROKER_REDIS_URL is set), the sandbox
upstreams, one API and one worker process; a demo tenant (its API key shown once, when it is
made); a curl line that works; ``.dev/env`` for the CLI (:mod:`broker.dev_state`).

Stopping (Ctrl-C, SIGTERM, SIGHUP): every child runs in a process group of its own, so the
terminal's Ctrl-C reaches this runner only, which stops them in order, each signalled once:
the API and the worker first (the worker lets its jobs in flight finish: they need the sandbox
and Redis), then the sandbox, then Redis, whose shutdown writes its AOF. Whatever is still
running at :data:`STOP_BUDGET_S` is killed (a job cut off so is finished at the next start,
as after any crash); a second Ctrl-C kills at once. Redis is stopped gracefully in every case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx

from .dev_state import DevLock, keep_secret, kept_json, kept_secret, remove_env, write_env
from .embedded_redis import EmbeddedRedis
from .core.logs import configure_logging
from .core.redis_check import masked_url, unreachable_line
from .core.settings import Settings

DEMO_TENANT = "demo"
DEMO_KEY_FILE = "demo_key"
DEMO_WEBHOOK_FILE = "demo_webhook"
DEMO_RECEIVER = "demo"       # the sandbox's webhook receiver /_sandbox/webhooks/demo
STOP_BUDGET_S = 4.0        # Ctrl-C to the last child gone (Redis's own shutdown comes on top: ~0.1 s)
START_TIMEOUT_S = 60.0
log = logging.getLogger("broker.dev")


class DevFailed(Exception):
    """One line for the operator; the runner stops what it started and exits 1."""


class _Stop:
    """SIGINT/SIGTERM/SIGHUP: the first asks for a stop, a second one for a stop at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.requested.is_set():
            self.hurry.set()
        else:
            self.requested.set()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and aiohttp bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli_name() -> str:
    """How the operator started us (``.venv/bin/session-broker`` under ``make dev``), for the hints."""
    argv0 = sys.argv[0] if sys.argv else ""
    return shlex.quote(argv0) if os.path.basename(argv0) == "session-broker" else "session-broker"


class DevRunner:
    def __init__(self, args: argparse.Namespace, settings: Settings, data: Path, log_format: str) -> None:
        self.args = args
        self.settings = settings
        self.data = data
        self.log_format = log_format
        self.stop = _Stop()
        self.redis: EmbeddedRedis | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.env_path = data / "env"

    # ---- start -------------------------------------------------------------------------

    def run(self, lock: DevLock) -> int:
        self.stop.install()
        try:
            self._start(lock)
            while not self.stop.requested.wait(0.2):
                exited = [f"the {name} (exit {p.returncode})" for name, p in self.children.items()
                          if p.poll() is not None]
                if exited:
                    raise DevFailed(f"{', '.join(exited)} stopped unexpectedly (its output is above); stopping the rest")
            print("\nsession-broker dev: stopping (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
            return 0
        except _Interrupted:  # a stop asked for while starting
            print("\nsession-broker dev: stopping", file=sys.stderr, flush=True)
            return 0
        except DevFailed as exc:
            print(f"session-broker dev: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            self._shutdown()

    def _start(self, lock: DevLock) -> None:
        args = self.args
        ports = {"--port": args.port, "--sandbox-port": args.sandbox_port, "--metrics-port": args.metrics_port,
                 "--api-metrics-port": args.api_metrics_port}
        busy = [f"{port} ({flag})" for flag, port in ports.items() if not _port_free(port)]
        if busy:
            raise DevFailed(f"port {', '.join(busy)} is in use on 127.0.0.1: stop what uses it or pick another port")
        redis_url = self._start_redis()
        sandbox = f"http://127.0.0.1:{args.sandbox_port}"
        api = f"http://127.0.0.1:{args.port}"
        lock.describe(f"session-broker dev (pid {os.getpid()}, API {api})")
        env = self._child_env(redis_url, sandbox)
        self._spawn("sandbox", env, "sandbox", "--port", str(args.sandbox_port))
        self._wait_http("sandbox", f"{sandbox}/_sandbox/healthz")
        self._spawn("API", env, "api", "--port", str(args.port), "--metrics-port", str(args.api_metrics_port),
                    "--metrics-host", "127.0.0.1")
        self._wait_http("API", f"{api}/readyz")
        self._spawn("worker", env, "worker", "--metrics-port", str(args.metrics_port), "--metrics-host", "127.0.0.1")
        self._wait_http("worker", f"http://127.0.0.1:{args.metrics_port}/healthz")
        tenant_id, key, prefix = _demo_key(api, env["BROKER_ADMIN_TOKEN"])
        if key is not None:  # kept (0600, like the admin token) so that a restart can reach the tenant API
            keep_secret(self.data / DEMO_KEY_FILE, key)
        try:
            receiver = _demo_webhook(api, sandbox, self.data)
        except httpx.HTTPError as exc:  # the rest runs without it; the banner says why
            receiver = f"webhooks     not registered: {str(exc).splitlines()[0]}"
        write_env(self.env_path, env, api, os.getpid())
        log.info("dev_ready", extra={"fields": {"api": api, "sandbox": sandbox, "redis": masked_url(redis_url),
                                                "env_file": str(self.env_path), "demo_tenant": tenant_id}})
        _banner(api, sandbox, args.metrics_port, args.api_metrics_port, masked_url(redis_url), self._env_hint(), tenant_id, key, prefix,
                receiver)

    def _start_redis(self) -> str:
        if self.settings.redis_configured:
            error = _ping(self.settings.redis_url)
            if error is not None:
                raise DevFailed(unreachable_line(self.settings, error, hint=(
                    "start that Redis, or unset BROKER_REDIS_URL to use an embedded one")))
            return self.settings.redis_url
        (self.data / "redis").mkdir(exist_ok=True)
        self.redis = EmbeddedRedis(data_dir=str((self.data / "redis").resolve()))
        try:
            self.redis.start()
        except Exception as exc:  # EmbeddedRedisError, OSError: no binary
            raise DevFailed(f"the embedded Redis did not start: {exc}") from None
        return self.redis.url

    def _child_env(self, redis_url: str, sandbox: str) -> dict[str, str]:
        import secrets as pysecrets

        from tenants.crypto import generate_secret_key

        settings = self.settings
        env = dict(os.environ)
        env.update(
            BROKER_REDIS_URL=redis_url,
            BROKER_SECRET_KEY=",".join(settings.secret_keys) or kept_secret(self.data / "secret_key",
                                                                             generate_secret_key),
            BROKER_ADMIN_TOKEN=kept_secret(self.data / "admin_token", lambda: pysecrets.token_urlsafe(24)),
            BROKER_OPENAI_BASE_URL=f"{sandbox}/v1",
            BROKER_AVATURN_BASE_URL=f"{sandbox}/api/v1",
            BROKER_OPENAI_API_KEY=settings.openai_api_key or "sk-sandbox-platform-key",
            BROKER_AVATURN_API_KEY=settings.avaturn_api_key or "avaturn-sandbox-platform-key",
            BROKER_LOG_FORMAT=self.log_format,
            # the sandbox's webhook receiver is plain http on loopback (make dev registers it)
            BROKER_WEBHOOK_ALLOW_PRIVATE="true",
        )
        return env

    def _spawn(self, name: str, env: dict[str, str], *argv: str) -> None:
        # process_group=0: a group of its own, out of the terminal's, so that Ctrl-C reaches this
        # runner alone and each child is signalled once, in order (not all at once, Redis first)
        self.children[name] = subprocess.Popen([sys.executable, "-m", "broker.cli", *argv], env=env,
                                               stdin=subprocess.DEVNULL, process_group=0)

    def _wait_http(self, name: str, url: str) -> None:
        proc = self.children[name]
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.stop.requested.is_set():
                raise _Interrupted
            if proc.poll() is not None:
                raise DevFailed(f"the {name} exited with {proc.returncode} while starting (its output is above)")
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            self.stop.requested.wait(0.1)
        raise DevFailed(f"the {name} did not answer {url} within {START_TIMEOUT_S:.0f}s (its output is above)")

    def _env_hint(self) -> str:
        return f"set -a; . {shlex.quote(str(self.env_path))}; set +a"

    # ---- stop --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        deadline = time.monotonic() + STOP_BUDGET_S
        remove_env(self.env_path)
        first = [p for name, p in self.children.items() if name in ("API", "worker")]
        self._terminate(first, deadline - 0.8)  # the sandbox and Redis get the rest
        self._terminate(list(self.children.values()), deadline)
        if self.redis is not None:
            self.redis.stop()  # SIGTERM: Redis writes its AOF and exits (killed after 10 s only)

    def _terminate(self, procs: Sequence[subprocess.Popen[bytes]], until: float) -> None:
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        while any(p.poll() is None for p in running) and time.monotonic() < until and not self.stop.hurry.is_set():
            time.sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class _Interrupted(DevFailed):
    pass


def _ping(url: str) -> BaseException | None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def run_dev(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    # the runner's own lines in the format of its children's (console unless asked otherwise)
    log_format = args.log_format or os.environ.get("BROKER_LOG_FORMAT") or "console"
    configure_logging(log_format, settings.log_level, settings.library_log_level)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    lock = DevLock(data)
    holder = lock.acquire()
    if holder is not None:
        print(f"session-broker dev: {data} is in use by {holder}; stop that one first, or use another --data-dir",
              file=sys.stderr)
        return 1
    try:
        return DevRunner(args, settings, data, log_format).run(lock)
    finally:
        lock.release()


def _demo_key(api: str, admin_token: str) -> tuple[str, str | None, str | None]:
    """(demo tenant id, a new key's plaintext, or the prefix of the key it already has).

    A key is made only when the demo tenant has no usable one (its first start, or after its
    keys were revoked): keys are stored as hashes, so an existing one cannot be shown again.
    The curl line then reads the key from ``$KEY``."""
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
            made = client.post("/admin/v1/tenants", json={
                "name": DEMO_TENANT,
                "quotas": {"max_concurrent_sessions": 5, "max_session_seconds": 600},
                "openai": {"session": {"model": "gpt-realtime", "instructions": "You are a friendly demo avatar.",
                                       "audio": {"output": {"voice": "marin"}}}},
            })
            made.raise_for_status()
            demo = made.json()
        tenant_id = str(demo["id"])
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        keys = client.get(f"/admin/v1/tenants/{tenant_id}/keys").json()["data"]
        usable = [k for k in keys if k["revoked_at"] is None and (k["not_after"] is None or k["not_after"] > now)]
        if usable:
            return tenant_id, None, str(usable[-1]["prefix"])
        created = client.post(f"/admin/v1/tenants/{tenant_id}/keys")
        created.raise_for_status()
        return tenant_id, str(created.json()["key"]), None


def _demo_webhook(api: str, sandbox: str, data: Path) -> str:
    """Registers the sandbox's receiver as the demo tenant's webhook endpoint, through the tenant
    API, once: the endpoint's id and secret are kept in ``.dev/demo_webhook`` (0600), and a restart
    finds the endpoint again (re-enabled, its URL updated to this sandbox port) instead of making
    another. The secret is given to the receiver at every start (the sandbox keeps nothing).
    Returns the banner's line about it."""
    url = f"{sandbox}/_sandbox/webhooks/{DEMO_RECEIVER}"
    key_path = data / DEMO_KEY_FILE
    key = key_path.read_text().strip() if key_path.exists() else None
    if not key:
        return ("webhooks     not registered: the demo key was made before this data dir kept it "
                f"(make a key and POST {api}/v1/webhook_endpoints with {url})")
    kept = kept_json(data / DEMO_WEBHOOK_FILE)
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        listed = client.get("/v1/webhook_endpoints")
        if listed.status_code == 401:
            return "webhooks     not registered: the kept demo key was revoked (delete .dev/demo_key and restart)"
        listed.raise_for_status()
        endpoints = {e["id"]: e for e in listed.json()["data"]}
        endpoint = endpoints.get(str(kept.get("id"))) if kept.get("secret") else None
        if endpoint is not None:
            secret = str(kept["secret"])
            change: dict[str, object] = {}
            if endpoint["url"] != url:
                change["url"] = url
            if endpoint["disabled"]:
                change["disabled"] = False
            if change:
                client.patch(f"/v1/webhook_endpoints/{endpoint['id']}", json=change).raise_for_status()
        else:
            if len(endpoints) >= 10:
                return "webhooks     not registered: the demo tenant has 10 endpoints already"
            made = client.post("/v1/webhook_endpoints", json={"url": url, "description": "make dev: the sandbox receiver"})
            made.raise_for_status()
            endpoint, secret = made.json(), str(made.json()["secret"])
            keep_secret(data / DEMO_WEBHOOK_FILE, json.dumps({"id": endpoint["id"], "secret": secret}), replace=True)
    httpx.put(f"{sandbox}/_sandbox/webhooks/{DEMO_RECEIVER}/config", json={"secrets": [secret]},
              timeout=10).raise_for_status()
    return f"webhooks     endpoint {endpoint['id']} -> the sandbox receiver; deliveries: GET {url}"


def _banner(api: str, sandbox: str, metrics_port: int, api_metrics_port: int, redis_url: str, env_hint: str, tenant_id: str,
            key: str | None, prefix: str | None, receiver: str) -> None:
    cli = _cli_name()
    if key is not None:
        key_text = f"Demo tenant {tenant_id}, its API key (shown this once):\n  {key}"
    else:
        key_text = (f"Demo tenant {tenant_id} has an API key {prefix}... (shown when it was made; keys are stored\n"
                    f"as hashes). Lost it? Make another:\n  {env_hint}; {cli} tenants keys create {tenant_id}")
    bearer = key or "$KEY"
    curl = (
        f"curl -s -X POST '{api}/v1/sessions?wait=10' -H \"Authorization: Bearer {bearer}\" "
        "-H 'Content-Type: application/json' -d '{\"ttl_seconds\": 60, \"end_user\": \"u_1\"}'"
    )
    print(f"""
Session Broker is running.
  API          {api}   (OpenAPI: {api}/schema/openapi.json; metrics http://127.0.0.1:{api_metrics_port}/metrics)
  console      {api}/console   (sign in with the demo key below)
  worker       metrics http://127.0.0.1:{metrics_port}/metrics
  sandbox      {sandbox}   (audit: {sandbox}/_sandbox/audit)
  {receiver}
  redis        {redis_url}
  CLI          {env_hint}    (then: {cli} tenants list)

{key_text}

Create a session and wait until it is ready:
  {curl}

Then: GET {api}/v1/sessions/<id>, DELETE {api}/v1/sessions/<id>. Ctrl-C stops everything.
""", flush=True)
