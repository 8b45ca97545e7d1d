"""A worker (and the API) started while Redis is unreachable, and the log lines an operator
sees: one clear periodic line naming Redis, a clean stop on SIGTERM while waiting, a start once
Redis comes up; arq's periodic "recording health" line gone at the default library level."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.embedded_redis import EmbeddedRedis, free_port
from broker.core.logs import configure_logging
from tenants.crypto import generate_secret_key
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def _env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_REDIS_URL=redis_url, BROKER_SECRET_KEY=generate_secret_key(), BROKER_LOG_FORMAT="console")
    return env


def _wait_for(predicate: object, what: str, timeout: float = 30.0) -> None:
    wait_until(predicate, timeout, what)  # type: ignore[arg-type]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(log: str, *argv: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
        path = tmp_path / log
        with open(path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "broker.cli", *argv], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(proc)
        return proc, path

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_worker_waits_for_redis_with_one_line_and_starts_once_it_is_up(spawn: object, tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc, log = spawn("worker.log", "worker", "--metrics-port", str(metrics), "--metrics-host", "127.0.0.1",  # type: ignore[operator]
                      env=_env(url))
    _wait_for(lambda: "unreachable" in log.read_text(), f"no waiting line: {log.read_text()}")
    line = next(x for x in log.read_text().splitlines() if "unreachable" in x)
    assert "WARNING" in line and url in line and "waits" in line
    assert httpx.get(f"http://127.0.0.1:{metrics}/healthz").status_code == 503  # not ready while waiting
    with EmbeddedRedis(port=port, aof=False):
        _wait_for(lambda: httpx.get(f"http://127.0.0.1:{metrics}/healthz").status_code == 200,
                  f"the worker never became healthy: {log.read_text()}")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "Traceback" not in text and "is reachable after" in text
    assert text.count("unreachable") <= 2  # periodic (every 10 s), not one line per check


def test_sigterm_while_waiting_for_redis_stops_the_worker_cleanly(spawn: object) -> None:
    proc, log = spawn("worker.log", "worker", env=_env(f"redis://127.0.0.1:{free_port()}/0"))  # type: ignore[operator]
    _wait_for(lambda: "unreachable" in log.read_text(), f"no waiting line: {log.read_text()}")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0 and time.monotonic() - started < 3
    assert "Traceback" not in log.read_text()


def test_the_api_says_in_one_line_that_redis_is_down_and_starts_without_waiting(spawn: object) -> None:
    port = free_port()
    url = f"redis://:pw-not-shown@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    proc, log = spawn("api.log", "api", "--port", str(port), env=_env(url))  # type: ignore[operator]

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    _wait_for(up, f"the API did not start: {log.read_text()}")
    assert time.monotonic() - started < 4.5  # no 5 s wait for a subscription that cannot come
    lines = [x for x in log.read_text().splitlines() if "broker.api:" in x]
    assert len(lines) == 1 and "unreachable" in lines[0] and "503" in lines[0], log.read_text()
    assert "pw-not-shown" not in log.read_text() and "127.0.0.1" in lines[0]
    window = time.monotonic() + 2.0  # long enough for the listeners' retries (0.05 s, doubling) to repeat
    while time.monotonic() < window:
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("listener lost") <= 2, text  # one per listener and outage, not one per retry


def _emit(library_level: str, records: list[tuple[str, tuple[object, ...]]]) -> str:
    configure_logging("console", "INFO", library_level)
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    arq = logging.getLogger("arq.worker")
    try:
        for msg, args in records:
            arq.info(msg, *args)
    finally:
        configure_logging("json", "INFO", "WARNING")
    return stream.getvalue()


def test_arq_health_lines_follow_the_library_level_and_the_shutdown_line_is_written_once() -> None:
    health = ("recording health: %s", ("Dec-02 16:00:00 j_complete=1",))
    start = ("Starting worker for %d functions: %s", (2, "a, b"))
    out = _emit("WARNING", [health, start])
    assert "recording health" not in out and "Starting worker" in out
    assert "recording health" in _emit("INFO", [health])
    shutdown = "shutdown on %s ◆ %d jobs complete ◆ %d failed ◆ %d retries ◆ %d to be completed"
    out = _emit("WARNING", [(shutdown, ("SIGINT", 1, 0, 0, 0)), (shutdown, ("SIGTERM", 1, 0, 0, 0))])
    assert "shutdown on SIGINT" in out and "SIGTERM" not in out
