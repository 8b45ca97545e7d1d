"""``session-broker dev`` as an operator meets it: started as a subprocess in a process group of
its own (as a terminal runs it), stopped by SIGINT sent to that whole group (the terminal's
Ctrl-C). Each test uses a temporary data dir and free ports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker.embedded_redis import EmbeddedRedis, free_port
from tenants.scope import TenantScope
from tests.fixtures.stack import wait_status
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.timeout(180)

STOP_LIMIT_S = 5.0


class Dev:
    def __init__(self, data: Path, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data, self.log = data, log
        self.ports = {"port": free_port(), "sandbox_port": free_port(), "metrics_port": free_port(),
                      "api_metrics_port": free_port()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(extra_env or {})
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}"

    @property
    def sandbox(self) -> str:
        return f"http://127.0.0.1:{self.ports['sandbox_port']}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "broker.cli", "dev", "--data-dir", str(self.data),
                "--port", str(self.ports["port"]), "--sandbox-port", str(self.ports["sandbox_port"]),
                "--metrics-port", str(self.ports["metrics_port"]),
                "--api-metrics-port", str(self.ports["api_metrics_port"])]

    def start(self) -> Dev:
        with open(self.log, "ab") as out:
            # start_new_session: a process group of its own, as a shell gives a foreground job
            self.proc = subprocess.Popen(self.argv(), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            assert proc.poll() is None, self.output()
            return (self.data / "env").exists()

        wait_until(ready, timeout, "dev ready (.dev/env written)", state=self.output)

    def ctrl_c(self) -> tuple[float, int]:
        """SIGINT to the runner's whole process group; (seconds until it exited, exit code)."""
        assert self.proc is not None
        started = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=30)
        return time.monotonic() - started, code

    def settings(self) -> dict[str, str]:
        out = {}
        for line in (self.data / "env").read_text().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                out[name] = value.strip("'")
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    runner = Dev(tmp_path / "dev-data", tmp_path / "dev.log")
    try:
        yield runner
    finally:
        runner.kill()


def cli(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(settings)
    return subprocess.run([sys.executable, "-m", "broker.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_ctrl_c_mid_job_stops_everything_in_time_redis_last_and_nothing_is_lost(dev: Dev, tmp_path: Path) -> None:
    """Invariants: a second runner on the same data dir exits at once with one line naming the
    running one; .dev/env lets the CLI reach the instance; SIGINT to the runner's process group
    with a provisioning job in flight ends every process within 5 s, exit 0, no traceback, with
    one shutdown line from the worker; the job's session is ready in Redis's AOF afterwards; a
    restart mints no new demo key."""
    dev.start().wait_ready()
    first_output = dev.output()
    key = re.search(r"\b(sbk_[A-Za-z0-9]+)\b", first_output)
    assert key, first_output
    assert "dev_ready [" in first_output and '{"event"' not in first_output  # console format, as the rest
    # the API's metrics on their own port (never on the tenant port), as the banner says
    api_metrics = f"http://127.0.0.1:{dev.ports['api_metrics_port']}/metrics"
    assert api_metrics in first_output
    assert "broker_http_requests_total" in httpx.get(api_metrics).text
    assert httpx.get(f"{dev.api}/metrics").status_code == 404

    # a second runner on the same data dir: refused at once, one line naming the running one
    second = Dev(dev.data, tmp_path / "second.log")
    started = time.monotonic()
    refused = subprocess.run(second.argv(), env=second.env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and time.monotonic() - started < 10
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0] and f"pid {dev.proc.pid}" in lines[0], refused.stderr  # type: ignore[union-attr]
    assert dev.api in lines[0] and refused.stdout == ""

    # the CLI reaches the instance through .dev/env (same Redis, same secret key)
    settings = dev.settings()
    listed = cli(settings, "tenants", "list")
    assert listed.returncode == 0 and '"name": "demo"' in listed.stdout, listed.stderr

    # a provisioning job in flight: Avaturn's create takes 1.5 s (the runner gives the worker 3.2 s)
    httpx.put(f"{dev.sandbox}/_sandbox/config", json={"create": {"latency_ms": 1500}}).raise_for_status()
    auth = {"Authorization": f"Bearer {key[1]}"}
    created = httpx.post(f"{dev.api}/v1/sessions", headers=auth, json={"ttl_seconds": 600})
    assert created.status_code == 202, created.text
    sid, tid = created.json()["id"], json.loads(listed.stdout)[0]["id"]
    with httpx.Client(base_url=dev.api, headers=auth) as client:
        wait_status(client, sid, {"provisioning"}, timeout=20)

    took, code = dev.ctrl_c()
    out = dev.output()
    assert code == 0 and took < STOP_LIMIT_S, (took, code, out[-3000:])
    assert "Traceback" not in out and "could not record" not in out
    # the worker got one signal (not the terminal's SIGINT and then the runner's SIGTERM)
    assert len(re.findall(r"shutdown on SIG[A-Z]+ ◆", out)) == 1 and "SIGINT" not in out, out[-3000:]
    assert not (dev.data / "env").exists()
    for port in dev.ports.values():  # every child is gone: its port is free again
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)

    # Redis's AOF has the session, finished: the worker completed the job before Redis stopped
    with EmbeddedRedis(data_dir=str((dev.data / "redis").resolve())) as restored:
        client = redis.Redis.from_url(restored.url)
        try:
            status = client.hget(TenantScope(tid).session(sid), "status")
        finally:
            client.close()
    assert status == b"ready", status

    # a restart: no new demo key, the existing one's prefix and the way to make another
    dev.start().wait_ready()
    restarted = dev.output()[len(out):]
    assert not re.search(r"\bsbk_[A-Za-z0-9]{12,}\b", restarted), restarted
    assert key[1][:8] in restarted and "tenants keys create" in restarted
    assert httpx.get(f"{dev.api}/v1/sessions/{sid}", headers=auth).json()["status"] == "ready"
    took, code = dev.ctrl_c()
    assert code == 0 and took < STOP_LIMIT_S and "Traceback" not in dev.output()


def test_an_unreachable_redis_url_is_one_line_about_redis(tmp_path: Path) -> None:
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    runner = Dev(tmp_path / "d", tmp_path / "d.log", {"BROKER_REDIS_URL": url})
    started = time.monotonic()
    proc = subprocess.run(runner.argv(), env=runner.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 15
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Redis" in lines[0] and "127.0.0.1" in lines[0], proc.stderr
    assert "s3cret" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "env").exists()


def test_a_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    import socket

    runner = Dev(tmp_path / "d", tmp_path / "d.log")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", runner.ports["sandbox_port"]))
        taken.listen()
        proc = subprocess.run(runner.argv(), env=runner.env, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert str(runner.ports["sandbox_port"]) in lines[0] and "--sandbox-port" in lines[0]
    assert not (tmp_path / "d" / "redis").exists()  # checked before anything was started


def test_the_sandbox_receiver_is_registered_once_and_keeps_verifying_after_a_restart(dev: Dev) -> None:
    """Invariants: make dev registers the sandbox's webhook receiver for the demo tenant through the
    tenant API; the receiver verifies the deliveries of a session's events; a restart registers no
    second endpoint and gives the receiver the kept secret again (deliveries still verify)."""
    dev.start().wait_ready()
    out = dev.output()
    key = re.search(r"\b(sbk_[A-Za-z0-9]+)\b", out)
    assert key, out
    receiver = f"{dev.sandbox}/_sandbox/webhooks/demo"
    assert f"deliveries: GET {receiver}" in out, out
    auth = {"Authorization": f"Bearer {key[1]}"}

    def endpoints() -> list[dict[str, object]]:
        listed = httpx.get(f"{dev.api}/v1/webhook_endpoints", headers=auth)
        assert listed.status_code == 200, listed.text
        return list(listed.json()["data"])

    def delivered(session_id: str) -> list[dict[str, object]]:
        return wait_until(lambda: [d for d in httpx.get(receiver).json()["deliveries"]
                                   if json.loads(str(d["body"]))["data"].get("session", {}).get("id") == session_id],
                          30, f"a delivery about {session_id} received", interval=0.1,
                          state=lambda: httpx.get(receiver).json())

    [endpoint] = endpoints()
    assert endpoint["url"] == receiver and "secret" not in endpoint
    assert oct((dev.data / "demo_webhook").stat().st_mode & 0o777) == "0o600"
    first = httpx.post(f"{dev.api}/v1/sessions", headers=auth, json={"ttl_seconds": 60}).json()["id"]
    assert all(d["verified"] for d in delivered(first))
    took, code = dev.ctrl_c()
    assert code == 0, dev.output()[-3000:]

    dev.start().wait_ready()
    assert [e["id"] for e in endpoints()] == [endpoint["id"]]
    second = httpx.post(f"{dev.api}/v1/sessions", headers=auth, json={"ttl_seconds": 60}).json()["id"]
    assert all(d["verified"] for d in delivered(second))
    took, code = dev.ctrl_c()
    assert code == 0 and "Traceback" not in dev.output()
