"""Real processes for the fault suite: worker subprocesses (``python -m broker.cli worker``)
that can be SIGKILLed or SIGTERMed, the API served in-process on a loopback port, and the
environment both are configured from (the same one, so they share the secret key)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from broker.core.processes import free_port, stop_process
from broker.core.settings import Settings
from tests.fixtures.stack import (
    ADMIN_TOKEN,
    PLATFORM_AVATURN_KEY,
    PLATFORM_OPENAI_KEY,
    Admin,
    ApiServer,
    WorkerThread,
)
from tests.fixtures.stack import broker_env as stack_env  # the harness's broker_env adds log levels
from tests.fixtures.wait import wait_until as wait

SECRETS = (ADMIN_TOKEN, PLATFORM_OPENAI_KEY, PLATFORM_AVATURN_KEY, "ek_")


def wait_until(predicate: Any, timeout: float, what: str, **options: Any) -> float:
    """Poll ``predicate`` until true; returns the seconds it took, fails after ``timeout``
    (``options``: those of tests.fixtures.wait.wait_until, e.g. ``state``)."""
    start = time.monotonic()
    wait(predicate, timeout, what, **options)
    return time.monotonic() - start


def counter(sandbox: Any, op: str, what: str = "requests") -> int:
    """A sandbox counter: ``requests`` started, answers by status (``"200"``), ``applied``..."""
    return int(sandbox.audit(summary=True)["counters"][op].get(what, 0))


def broker_env(redis_url: str, sandbox: Any, **overrides: Any) -> dict[str, str]:
    """The ``BROKER_*`` environment of one broker deployment (API and workers alike), with the
    libraries' INFO lines on (the SIGTERM test reads arq's line of when the signal was taken)."""
    return stack_env(redis_url, sandbox, **{"BROKER_LOG_LEVEL": "INFO", "BROKER_LIBRARY_LOG_LEVEL": "INFO", **overrides})


class WorkerProcess:
    """One ``session-broker worker`` child process with its own metrics port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.startup_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> WorkerProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        cmd = [sys.executable, "-m", "broker.cli", "--log-format", "console", "worker",
               "--metrics-port", str(self.metrics_port), "--metrics-host", "127.0.0.1"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env={**base, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}; log:\n{self.log_text()[-3000:]}")
            return self.healthy()

        wait(healthy, timeout, "the worker became healthy", state=lambda: self.log_text()[-3000:])
        self.startup_s = time.monotonic() - self.started_at
        return self

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the worker."""
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, 30, 10)

    def metrics_text(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Harness:
    """API in-process + worker subprocesses, all configured from one environment."""

    def __init__(self, redis_url: str, sandbox: Any, workdir: Path, **overrides: Any) -> None:
        self.env = broker_env(redis_url, sandbox, **overrides)
        self.settings = Settings.from_env(self.env)
        self.sandbox = sandbox
        self.workdir = workdir
        self.api: ApiServer | None = None
        self.admin: Admin | None = None
        self.workers: list[WorkerProcess] = []
        self.threads: list[WorkerThread] = []

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def start_api(self) -> Harness:
        self.api = ApiServer(self.settings).start()
        self.admin = Admin(self.api.url)
        return self

    def worker(self, **extra_env: Any) -> WorkerProcess:
        env = {**self.env, **{k: str(v) for k, v in extra_env.items()}}
        w = WorkerProcess(env, self.workdir / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        return w.start()

    def thread_worker(self) -> WorkerThread:
        """A worker in a thread of the test process: the survivor that takes over from a killed
        worker process, or the worker of upstream-fault tests (it starts in well under a second)."""
        w = WorkerThread(self.settings).start()
        self.threads.append(w)
        return w

    def tenant(self, name: str = "acme", **body: Any) -> tuple[dict[str, Any], str]:
        assert self.admin is not None
        quotas = {"max_concurrent_sessions": 50, "sessions_per_minute": 200, "sessions_per_day": 10_000,
                  "openai_requests_per_minute": 6000, **body.pop("quotas", {})}
        return self.admin.tenant(name, quotas=quotas, **body)

    def worker_logs(self) -> str:
        return "\n".join(w.log_text() for w in self.workers)

    def assert_no_secret_logged(self, *extra: str) -> None:
        """No credential (platform keys, admin token, client secrets) in any worker log line."""
        logs = self.worker_logs()
        for secret in (*SECRETS, *extra):
            assert secret not in logs, f"a secret leaked into the worker logs ({secret[:3]}...)"

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.stop()
        if self.admin is not None:
            self.admin.close()
        if self.api is not None:
            self.api.stop()
