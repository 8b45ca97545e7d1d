"""The processes of one benchmark run: redis-server, the sandbox (subprocess), the API and
worker(s) started with the project's own commands, and the two baselines. Each child gets
the same environment a deployment would (``BROKER_*``); nothing runs in the bench process
but the load generator and the bookkeeping."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import redis

from broker.core.processes import free_port, stop_process
from broker.embedded_redis import EmbeddedRedis
from tenants.crypto import generate_secret_key
from workers.sandbox import SandboxProcess

from tests.fixtures.wait import wait_until

from .baselines import FLOOR_KEY, PLATFORM_AVATURN_KEY, PLATFORM_OPENAI_KEY, SESSION

CLI = [sys.executable, "-m", "broker.cli"]


@dataclass
class BenchTenant:
    id: str
    key: str


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str = ""
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.popen.pid)

    def cpu_seconds(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def pause(self) -> None:
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
        stop_process(self.popen, 25)


class Stack:
    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.redis_server = EmbeddedRedis()
        self.sandbox = SandboxProcess()
        self.admin_token = secrets.token_urlsafe(24)
        self.bench_token = secrets.token_urlsafe(24)
        self.procs: dict[str, Proc] = {}
        self.env: dict[str, str] = {}
        self._r: redis.Redis | None = None
        self._names: dict[str, int] = {}  # tenant names asked for, for unique names

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> Stack:
        self.redis_server.start()
        self.sandbox.start()
        self.env = {
            **os.environ,
            "BROKER_REDIS_URL": self.redis_server.url,
            "BROKER_ADMIN_TOKEN": self.admin_token,
            "BROKER_SECRET_KEY": generate_secret_key(),
            "BROKER_OPENAI_BASE_URL": self.sandbox.openai_base_url,
            "BROKER_AVATURN_BASE_URL": self.sandbox.avaturn_base_url,
            "BROKER_OPENAI_API_KEY": PLATFORM_OPENAI_KEY,
            "BROKER_AVATURN_API_KEY": PLATFORM_AVATURN_KEY,
            # the webhook rows deliver to the sandbox's receiver: http on loopback
            "BROKER_WEBHOOK_ALLOW_PRIVATE": "true",
        }  # everything else (log level and format, max jobs...) is the project's default
        self.r.set(FLOOR_KEY, "floor")
        return self

    def redis_stalls(self) -> dict[str, Any]:
        """What Redis itself did that can stall every client: forks (AOF rewrites) and AOF
        writes that had to wait for a slow fsync (its log says "Asynchronous AOF fsync is taking
        too long"): to read a run's latency outliers with."""
        persistence, stats = self.r.info("persistence"), self.r.info("stats")
        # (forks are AOF rewrites here: no RDB snapshots; Redis 6.2 has no aof_rewrites counter)
        return {"aof_delayed_fsync": int(persistence.get("aof_delayed_fsync", 0) or 0),
                "total_forks": int(stats.get("total_forks", 0) or 0),
                "latest_fork_usec": int(stats.get("latest_fork_usec", 0) or 0)}

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.procs.clear()
        if self._r is not None:
            self._r.close()
        self.sandbox.stop()
        log = os.path.join(self.redis_server.data_dir, "redis.log")
        if os.path.exists(log):  # kept with the processes' logs (the data dir goes)
            shutil.copy(log, os.path.join(self.log_dir, "redis.log"))
        self.redis_server.cleanup()

    @property
    def r(self) -> redis.Redis:
        if self._r is None:
            self._r = redis.Redis.from_url(self.redis_server.url)
        return self._r

    def _spawn(self, name: str, argv: list[str], health_url: str) -> Proc:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115
        popen = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        proc = Proc(name, popen, health_url.rsplit("/", 1)[0])
        self.procs[name] = proc
        def up() -> bool:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}; see {self.log_dir}/{name}.log")
            return httpx.get(health_url, timeout=1).status_code < 500

        wait_until(up, 30, f"{name} up (see {self.log_dir}/{name}.log)", interval=0.1, ignoring=(httpx.HTTPError,))
        return proc

    def start_api(self, name: str = "api") -> Proc:
        port = free_port()
        return self._spawn(name, [*CLI, "api", "--port", str(port)], f"http://127.0.0.1:{port}/readyz")

    def start_worker(self, name: str = "worker", extra_env: dict[str, str] | None = None) -> Proc:
        port = free_port()
        saved = self.env
        self.env = {**saved, **(extra_env or {})}
        try:
            argv = [*CLI, "worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
            return self._spawn(name, argv, f"http://127.0.0.1:{port}/healthz")
        finally:
            self.env = saved

    def start_baseline(self, which: str) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "tests.bench.baselines", which, "--port", str(port),
                "--redis-url", self.redis_server.url, "--token", self.bench_token,
                "--openai", self.sandbox.openai_base_url, "--avaturn", self.sandbox.avaturn_base_url]
        proc = self._spawn(f"baseline_{which}", argv, f"http://127.0.0.1:{port}/_none")
        return proc

    def stop_proc(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            proc.stop()

    def latency(self, mint_ms: float, create_ms: float) -> None:
        self.sandbox.configure({"mint": {"latency_ms": mint_ms}, "create": {"latency_ms": create_ms}})

    # ---- admin -------------------------------------------------------------------------

    def admin(self) -> httpx.Client:
        api = self.procs["api"].url
        return httpx.Client(base_url=api, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30)

    def tenant(self, name: str, **quotas: Any) -> BenchTenant:
        """A tenant with generous quotas (overridable) and the benchmark session config, and a key.
        Tenant names are unique per deployment: a scenario that asks for a name twice gets a suffix."""
        self._names[name] = self._names.get(name, 0) + 1
        body = {
            "name": name if self._names[name] == 1 else f"{name}-{self._names[name]}",
            "quotas": {"sessions_per_minute": 100_000, "max_concurrent_sessions": 100_000,
                       "sessions_per_day": 10_000_000, "max_session_seconds": 7200,
                       "openai_requests_per_minute": 100_000, **quotas},
            "openai": {"session": SESSION},
        }
        with self.admin() as http:
            r = http.post("/admin/v1/tenants", json=body)
            r.raise_for_status()
            k = http.post(f"/admin/v1/tenants/{r.json()['id']}/keys")
            k.raise_for_status()
            return BenchTenant(str(r.json()["id"]), str(k.json()["key"]))

    def session_fields(self, tenant_id: str, ids: list[str], *fields: str) -> list[list[str | None]]:
        """``fields`` of each session straight from its hash (pipelined)."""
        pipe = self.r.pipeline(transaction=False)
        for sid in ids:
            pipe.hmget(f"sb:t:{tenant_id}:s:{sid}", list(fields))
        return [[v.decode() if v is not None else None for v in row] for row in pipe.execute()]

    def flush_sessions(self) -> None:
        """Forget every session, job and quota counter; keep tenants and keys."""
        keep = ("sb:tenant:", "sb:tenants", "sb:apikey:", "bench:")
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for key in self.r.scan_iter(count=5000):
            text = key.decode()
            if text.startswith(keep) or (text.startswith("sb:t:") and text.rsplit(":", 2)[-1] in ("keys",)) \
                    or text.endswith(":keys:used"):
                continue
            pipe.unlink(key)
            n += 1
            if n % 5000 == 0:
                pipe.execute()
        pipe.execute()

    def command_count(self) -> int:
        stats = self.r.info("stats")
        return int(stats["total_commands_processed"])
