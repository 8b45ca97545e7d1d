"""Tracing off costs nothing: a process that creates, provisions and terminates sessions through
its API and worker (tests/tracing/off_probe.py) without any OTEL_* variable imports neither
OpenTelemetry's SDK, nor an exporter, nor the aiohttp instrumentation (Litestar itself imports the
API, its plugin module and the ASGI middleware under it when installed), creates no span object
and attaches no context."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from broker.embedded_redis import EmbeddedRedis
from tests.fixtures.stack import broker_env


@pytest.mark.timeout(90)
def test_a_process_with_tracing_off_makes_no_span_and_loads_no_sdk(redis_server: EmbeddedRedis, sandbox: Any) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "OTEL_"))}
    env = {**inherited, **broker_env(redis_server.url, sandbox)}
    done = subprocess.run([sys.executable, "-m", "tests.tracing.off_probe"], env=env, capture_output=True,
                          text=True, timeout=80, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["spans"] == 0 and seen["attach"] == 0, seen
    ours = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation.aiohttp_client")
    assert [m for m in seen["modules"] if m.startswith(ours)] == [], seen["modules"]
