"""Broker processes started with the project's own commands (``python -m broker.cli api|worker``),
each logging to its own file, with health waits and signals by process id."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from broker.core.processes import free_port, stop_process
from tests.fixtures.stack import child_env
from tests.fixtures.wait import wait_until


def broker_env(redis_url: str, sandbox: Any, **overrides: str) -> dict[str, str]:
    """The environment of every process of one deployment (tests/fixtures/stack.child_env),
    with the default provisioning deadline and only warnings logged."""
    defaults = {"BROKER_PROVISION_DEADLINE_SECONDS": "60", "BROKER_LOG_FORMAT": "json", "BROKER_LOG_LEVEL": "WARNING"}
    return child_env(redis_url, sandbox, **{**defaults, **overrides})


class BrokerProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path, health_url: str) -> None:
        self.name, self.argv, self.env, self.health_url = name, argv, env, health_url
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def api(cls, name: str, env: dict[str, str], log_dir: Path) -> BrokerProcess:
        port = free_port()
        proc = cls(name, ["api", "--port", str(port)], env, log_dir, f"http://127.0.0.1:{port}/readyz")
        proc.url = f"http://127.0.0.1:{port}"
        return proc

    @classmethod
    def worker(cls, name: str, env: dict[str, str], log_dir: Path) -> BrokerProcess:
        port = free_port()
        argv = ["worker", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
        return cls(name, argv, env, log_dir, f"http://127.0.0.1:{port}/healthz")

    url: str = ""

    def start(self) -> BrokerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "broker.cli", *self.argv], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        proc = self.proc
        assert proc is not None

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {proc.returncode}:\n{self.tail()}")
            return httpx.get(self.health_url, timeout=1).status_code == 200

        wait_until(healthy, timeout, f"{self.name} healthy", ignoring=(httpx.HTTPError,), state=self.tail)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash, an OOM kill, a lost node)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@contextlib.contextmanager
def running(request: Any, procs: dict[str, BrokerProcess], client: Any,
            start: Iterable[str] | None = None) -> Iterator[None]:
    """Start ``start`` (default: every process) and wait until each is healthy; on exit print
    every process's log tail if the test failed, stop them all and close ``client``."""
    names = list(procs) if start is None else list(start)
    try:
        for name in names:
            procs[name].start()
        for name in names:
            procs[name].wait_healthy()
        yield
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            for proc in procs.values():
                print(f"--- {proc.name} (log tail)\n{proc.tail()}")
    finally:
        for proc in procs.values():
            proc.stop()
        client.close()
