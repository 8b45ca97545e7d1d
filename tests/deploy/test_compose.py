"""deploy/compose.yaml: valid against the Compose Specification schema (vendored, always run)
and with ``docker compose config`` when the Compose v2 CLI is installed; Redis durable (AOF,
volume, noeviction); the API, two workers with their own metrics ports, the sandbox behind
its profile; Prometheus and Grafana wired to the project's files; secrets only from the
env_file / compose secrets; every command accepted by the real CLI parser."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from broker.cli import _parser
from broker.core.settings import Settings
from tenants.crypto import generate_secret_key

from .tooling import DEPLOY, docker_compose, schema, tool_missing

COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "broker.env.example"
SECRET_VARS = ("BROKER_SECRET_KEY", "BROKER_ADMIN_TOKEN", "BROKER_OPENAI_API_KEY", "BROKER_AVATURN_API_KEY")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema("compose-spec.json"))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_valid_against_compose_spec(compose: dict[str, Any]) -> None:
    assert _errors(compose) == []


def test_schema_check_is_live(compose: dict[str, Any]) -> None:
    """The vendored schema rejects what Compose rejects: a misspelt key, a wrong type."""
    typo = copy.deepcopy(compose)
    typo["services"]["api"]["stop_grace_priod"] = "10s"
    assert any("stop_grace_priod" in e for e in _errors(typo))
    wrong = copy.deepcopy(compose)
    wrong["services"]["redis"]["volumes"] = "redis-data:/data"
    assert _errors(wrong)


def test_docker_compose_config(tmp_path: Path) -> None:
    """`docker compose config` (Compose v2) accepts the file and every profile."""
    cli = docker_compose()
    if cli is None:
        tool_missing("the Docker Compose v2 CLI", "no `docker compose` plugin nor docker-compose v2 on PATH; "
                     "the compose-spec schema check above still runs", required_in_ci=False)
    # A scratch copy with the example env file standing in for the (git-ignored) real one.
    work = tmp_path / "deploy"
    shutil.copytree(DEPLOY, work, ignore=shutil.ignore_patterns("broker.env"))
    shutil.copy(ENV_EXAMPLE, work / "broker.env")
    assert cli is not None
    for extra in ([], ["--profile", "sandbox"]):
        done = subprocess.run([*cli, "-f", str(work / "compose.yaml"), *extra, "config", "--quiet"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr


def _broker_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("env_file")}


def test_redis_is_durable(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--appendfsync everysec" in cmd
    assert "--maxmemory-policy noeviction" in cmd, "queue and session state must never be evicted"
    assert "--hash-max-listpack-value 1024" in cmd, "session hashes in the compact encoding (issue 8: <= 2 KiB each)"
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]


def test_api_two_workers_and_sandbox_profile(compose: dict[str, Any]) -> None:
    parser = _parser()
    services = compose["services"]
    api = parser.parse_args(services["api"]["command"])
    assert api.command == "api" and api.host == "0.0.0.0" and api.port == 8000
    assert api.metrics_port == 9100 and (api.metrics_host or api.host) == "0.0.0.0"
    assert all(p.startswith("127.0.0.1:") for p in services["api"]["ports"] if p.endswith(f":{api.metrics_port}"))
    workers = {n: s for n, s in services.items() if s.get("command", [None])[0] == "worker"}
    assert len(workers) == 2
    host_ports = set()
    for svc in workers.values():
        args = parser.parse_args(svc["command"])
        assert args.metrics_port == 9100 and args.metrics_host == "0.0.0.0"
        assert svc["environment"]["HEALTHCHECK_PORT"] == "9100"
        host_ports.add(svc["ports"][0].rsplit(":", 1)[0])
        # > job_completion_wait (20 s) + job timeout (30 s)
        assert int(svc["stop_grace_period"].rstrip("s")) > 50
    assert len(host_ports) == 2, "each worker publishes its metrics on its own port"
    sandbox = services["sandbox"]
    assert sandbox["profiles"] == ["sandbox"]
    assert parser.parse_args(sandbox["command"]).command == "sandbox"
    assert all("profiles" not in s for n, s in services.items() if n != "sandbox")
    for svc in _broker_services(compose).values():
        assert svc["environment"]["BROKER_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_secrets_come_from_env_file_or_compose_secrets(compose: dict[str, Any]) -> None:
    """No secret value in compose.yaml: the broker's come from the env_file, Grafana's from a
    compose secret; the example env file is complete and valid once filled in."""
    for name, svc in _broker_services(compose).items():
        assert [e["path"] for e in svc["env_file"]] == ["./broker.env"], name
        assert not set(SECRET_VARS) & set(svc.get("environment", {})), name
    grafana = compose["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in grafana["secrets"] and "grafana_admin_password" in compose["secrets"]
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    assert set(SECRET_VARS) <= set(env), "the example names every secret"
    assert not env["BROKER_SECRET_KEY"] and not env["BROKER_ADMIN_TOKEN"], "no secret values in git"
    filled = {**env, "BROKER_SECRET_KEY": generate_secret_key(), "BROKER_REDIS_URL": "redis://redis:6379/0"}
    Settings.from_env(filled).require_secret_key()
    assert (DEPLOY / ".gitignore").read_text().split() == ["broker.env"]


def _mounts(svc: dict[str, Any]) -> dict[str, str]:
    out = {}
    for volume in svc["volumes"]:
        src, target = volume.split(":")[:2]
        out[target] = src
    return out


def test_prometheus_and_grafana_use_the_project_files(compose: dict[str, Any]) -> None:
    """Prometheus loads deploy/prometheus/prometheus.yml and its rules; Grafana is provisioned
    from deploy/grafana; the scrape config names the compose services and ports."""
    prom = _mounts(compose["services"]["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    assert prom["/etc/prometheus/rules"] == "./prometheus/rules"
    graf = _mounts(compose["services"]["grafana"])
    assert graf["/etc/grafana/provisioning"] == "./grafana/provisioning"
    for src in (*prom.values(), *graf.values()):
        if src.startswith("./"):
            assert (DEPLOY / src).exists(), f"deploy/{src[2:]} is missing"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert {"api:9100", "worker-1:9100", "worker-2:9100"} <= targets, targets
    assert not any(t.endswith(":8000") for t in targets), "the API's tenant port serves no /metrics"
    api_job = next(job for job in config["scrape_configs"] if job["job_name"] == "session-broker-api")
    api_args = _parser().parse_args(compose["services"]["api"]["command"])
    assert [f"api:{api_args.metrics_port}"] == [t for sc in api_job["static_configs"] for t in sc["targets"]]
    assert any(str(r).startswith(("/etc/prometheus/rules/", "rules/")) for r in config.get("rule_files", []))
    dashboards_dir = graf_dashboards = None
    for target, src in graf.items():
        if src == "./grafana/dashboards":
            dashboards_dir, graf_dashboards = target, src
    assert dashboards_dir is not None and graf_dashboards is not None
    providers = [yaml.safe_load(p.read_text()) for p in (DEPLOY / "grafana/provisioning/dashboards").glob("*.y*ml")]
    paths = {prov["options"]["path"] for doc in providers for prov in doc["providers"]}
    assert dashboards_dir in paths, f"Grafana provisioning reads {paths}, compose mounts {dashboards_dir}"
