"""Real processes for the live observability test: ``session-broker api`` / ``worker``
(started through the CLI, JSON logs to files) and a real Prometheus scraping them on
loopback with the project's own scrape config and rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from broker.core.processes import free_port, stop_process
from tests.fixtures.stack import child_env
from tests.fixtures.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
API_JOB, WORKER_JOB = "session-broker-api", "session-broker-worker"


def broker_env(redis_url: str, sandbox: Any) -> dict[str, str]:
    # the webhook deliveries go to the sandbox's receiver: http on loopback
    return child_env(redis_url, sandbox, BROKER_LOG_FORMAT="json", BROKER_WEBHOOK_ALLOW_PRIVATE="true")


class Proc:
    """One child process, its stderr in a file; stopped by its own handle only."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=ROOT)

    def wait_http(self, url: str, timeout: float = 30) -> None:
        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return httpx.get(url, timeout=1).status_code == 200

        wait_until(answers, timeout, f"{url} answered 200", ignoring=(httpx.HTTPError,),
                   state=lambda: self.log.read_text()[-3000:])

    def stop(self) -> None:
        stop_process(self.proc, 25, 10)


def broker(command: list[str], env: dict[str, str], log: Path) -> Proc:
    return Proc([sys.executable, "-m", "broker.cli", *command], log, env)


def prometheus_config(tmp: Path, api: str, workers: list[str]) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets, 1 s scrapes and evaluations,
    and the absolute path of the project's rules (job names kept: rules and panels use them)."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / "rules" / "*.yml")]
    targets = {API_JOB: [api], WORKER_JOB: workers}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, binary: str, config: Path, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], tmp / "prometheus.log")

    def ready(self) -> Prometheus:
        self.proc.wait_http(f"{self.url}/-/ready", timeout=30)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", f"query failed: {expr}\n{body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, expected: float, timeout: float = 20) -> None:
        wait_until(lambda: self.scalar(expr) == expected, timeout, f"{expr} == {expected}", interval=0.25,
                   state=lambda: f"{expr} = {self.scalar(expr)}")

    def stop(self) -> None:
        self.proc.stop()
